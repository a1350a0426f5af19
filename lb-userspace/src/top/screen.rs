//! The live view of `lbctl top`, drawn with ratatui on crossterm: the terminal goes
//! raw on the alternate screen and is restored on every way out (`q`, Esc, Ctrl-C, an
//! error, a panic: ratatui's hook).

use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Cell, Paragraph, Row, Table, Wrap},
};

use super::{COLUMNS, Column, Sample, cut, fit, right_aligned, rows, sample, si};
use crate::{protocol::Status, table::text_width};

/// What the screen shows: the last sample, or why there is none.
#[derive(Default)]
struct View {
    sample: Option<Sample>,
    error: Option<String>,
    every: Duration,
}

/// Runs until `q`, Esc or Ctrl-C, reading a `Status` from `fetch` every `every`. The
/// first reading is taken before the screen changes, so that an agent that does not
/// answer is an error on a normal terminal; later failures are shown and retried.
pub fn run(mut fetch: impl FnMut() -> Result<Status>, every: Duration) -> Result<()> {
    let first = fetch()?;
    let mut terminal = ratatui::try_init()
        .map_err(|e| anyhow::anyhow!("cannot take over the terminal ({e}): is this a terminal?"))?;
    let result = run_loop(&mut terminal, &mut fetch, first, every);
    ratatui::restore();
    result
}

fn run_loop(
    terminal: &mut DefaultTerminal,
    fetch: &mut dyn FnMut() -> Result<Status>,
    first: Status,
    every: Duration,
) -> Result<()> {
    let mut view = View {
        every,
        // No rates before a second reading.
        sample: Some(sample(&first, &first, 0.0)),
        error: None,
    };
    let mut last = (Instant::now(), first);
    let mut next = Instant::now() + every;
    terminal.draw(|f| draw(f, &view))?;
    loop {
        if Instant::now() >= next {
            let at = Instant::now();
            match fetch() {
                Ok(status) => {
                    let secs = at.duration_since(last.0).as_secs_f64();
                    view.sample = Some(sample(&last.1, &status, secs));
                    view.error = None;
                    last = (at, status);
                }
                Err(e) => view.error = Some(format!("{e:#}")),
            }
            next = at + every;
            terminal.draw(|f| draw(f, &view))?;
        }
        if event::poll(next.saturating_duration_since(Instant::now()))? {
            match event::read()? {
                Event::Key(key) if key.kind == KeyEventKind::Press => match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(());
                    }
                    _ => {}
                },
                Event::Resize(..) => {
                    terminal.draw(|f| draw(f, &view))?;
                }
                _ => {}
            }
        }
    }
}

fn per_second(what: &str, rates: &std::collections::BTreeMap<String, f64>) -> String {
    if rates.is_empty() {
        return format!("{what}: none");
    }
    let list: Vec<String> = rates
        .iter()
        .map(|(k, v)| format!("{k} {}", si(Some(*v))))
        .collect();
    format!("{what}: {}", list.join(", "))
}

fn draw(frame: &mut Frame, view: &View) {
    let area = frame.area();
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(3),
    ])
    .areas(area);
    let Some(s) = &view.sample else {
        let text = view
            .error
            .clone()
            .unwrap_or_else(|| "waiting for the agent…".to_string());
        frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), area);
        return;
    };
    let title = format!(
        "lbctl top  {}  vrrp {}  {}  every {:.0} s  q quits",
        s.interface,
        s.vrrp_state,
        if s.serving { "serving" } else { "not serving" },
        view.every.as_secs_f64()
    );
    frame.render_widget(
        Paragraph::new(cut(&title, usize::from(area.width)))
            .style(Style::new().add_modifier(Modifier::REVERSED)),
        head,
    );
    let rows = rows(s);
    let columns: Vec<Column> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (header, min, drop_rank))| Column {
            header,
            natural: rows
                .iter()
                .map(|(_, cells)| text_width(&cells[i]))
                .chain([text_width(header)])
                .max()
                .unwrap_or(0)
                .try_into()
                .unwrap_or(u16::MAX),
            min: *min,
            drop_rank: *drop_rank,
        })
        .collect();
    let widths = fit(&columns, body.width);
    let shown: Vec<(usize, u16)> = widths
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (i, w)))
        .collect();
    let cell = |i: usize, w: u16, text: &str| {
        let text = cut(text, usize::from(w));
        if right_aligned(i) {
            Cell::from(Line::from(text).right_aligned())
        } else {
            Cell::from(text)
        }
    };
    let header = Row::new(shown.iter().map(|&(i, w)| cell(i, w, COLUMNS[i].0)))
        .style(Style::new().add_modifier(Modifier::UNDERLINED));
    let body_rows = rows.iter().map(|(service, cells)| {
        let row = Row::new(shown.iter().map(|&(i, w)| cell(i, w, &cells[i])));
        if *service {
            row.style(Style::new().add_modifier(Modifier::BOLD))
        } else {
            row
        }
    });
    let table = Table::new(body_rows, shown.iter().map(|&(_, w)| Constraint::Length(w)))
        .header(header)
        .column_spacing(1);
    frame.render_widget(table, body);
    let mut lines = vec![
        Line::from(per_second("not forwarded/s", &s.not_forwarded_per_s)),
        Line::from(per_second("events/s", &s.events_per_s)),
    ];
    if let Some(e) = &view.error {
        lines.push(Line::from(format!("error: {e}")));
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), foot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::{Terminal, backend::TestBackend};

    fn a_sample() -> Sample {
        use crate::{
            protocol::BackendState,
            top::{BackendSample, Rates, ServiceSample},
        };
        let rates = Rates {
            packets_per_s: Some(12_345.0),
            bits_per_s: Some(98_765_432.0),
            new_flows_per_s: Some(120.0),
        };
        let backend = |name: &str, address: &str| BackendSample {
            name: name.into(),
            address: address.into(),
            state: BackendState::Up,
            health: "up".into(),
            weight: 100,
            active_flows: 42,
            rates: rates.clone(),
        };
        let mut not_forwarded = std::collections::BTreeMap::new();
        not_forwarded.insert("drop_fragment".to_string(), 3.0);
        Sample {
            interval_s: 1.0,
            interface: "eth0".into(),
            vrrp_state: "master".into(),
            serving: true,
            services: vec![ServiceSample {
                name: "a-service-with-a-rather-long-name".into(),
                vip: "2001:db8:ffff:ffff:ffff:ffff:ffff:10".into(),
                port: 443,
                active_flows: 84,
                rates: rates.clone(),
                backends: vec![
                    backend(
                        "backend-with-a-long-name-1",
                        "2001:db8:ffff:ffff:ffff:ffff:ffff:21",
                    ),
                    backend("b2", "192.0.2.22"),
                ],
            }],
            not_forwarded_per_s: not_forwarded,
            events_per_s: Default::default(),
        }
    }

    fn render(width: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, 12)).unwrap();
        let view = View {
            sample: Some(a_sample()),
            error: None,
            every: Duration::from_secs(1),
        };
        terminal.draw(|f| draw(f, &view)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect()
    }

    #[test]
    fn eighty_columns_show_names_numbers_and_reasons() {
        let lines = render(80);
        let text = lines.join("\n");
        assert!(lines[0].contains("vrrp master"), "{text}");
        assert!(
            text.contains("pkt/s") && text.contains("bit/s") && text.contains("new/s"),
            "{text}"
        );
        assert!(text.contains("12.3k") && text.contains("98.8M"), "{text}");
        assert!(text.contains("b2"), "{text}");
        assert!(text.contains("not forwarded/s: drop_fragment 3"), "{text}");
        // The backend row's numbers are all there: name, state, rates, active flows.
        let b2 = lines.iter().find(|l| l.contains(" b2")).expect("b2's row");
        assert!(
            b2.contains("up") && b2.contains("12.3k") && b2.contains("42"),
            "{b2}"
        );
    }

    #[test]
    fn wider_terminals_show_whole_ipv6_addresses_and_health() {
        let text = render(160).join("\n");
        assert!(
            text.contains("2001:db8:ffff:ffff:ffff:ffff:ffff:21"),
            "{text}"
        );
        assert!(text.contains("backend-with-a-long-name-1"), "{text}");
        assert!(text.contains("health"), "{text}");
    }
}
