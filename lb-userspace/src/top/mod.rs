//! `lbctl top`: rates from two `Status` answers a known interval apart, and how the
//! live view lays its columns out in the terminal's width. Everything here is pure;
//! `screen` draws it.

pub mod screen;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::protocol::{BackendState, Status};

/// A counter's rate between two readings `secs` apart. `None` when it cannot be known:
/// the counter went back (the maps were made anew: a reset, not a wrap) or no time
/// passed. A u64 that wrapped past its maximum still gives its true difference.
pub fn rate(before: u64, now: u64, secs: f64) -> Option<f64> {
    // NaN too.
    if secs.is_nan() || secs <= 0.0 {
        return None;
    }
    let delta = now.wrapping_sub(before);
    // A reset shows as a "difference" of nearly 2^64; a real wrap as a small one.
    if delta > i64::MAX as u64 {
        return None;
    }
    Some(delta as f64 / secs)
}

/// Per-second rates of one service or backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    pub packets_per_s: Option<f64>,
    pub bits_per_s: Option<f64>,
    pub new_flows_per_s: Option<f64>,
}

impl Rates {
    fn between(before: Option<(u64, u64, u64)>, now: (u64, u64, u64), secs: f64) -> Self {
        match before {
            None => Rates::default(),
            Some((p, b, n)) => Rates {
                packets_per_s: rate(p, now.0, secs),
                bits_per_s: rate(b, now.1, secs).map(|r| r * 8.0),
                new_flows_per_s: rate(n, now.2, secs),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendSample {
    pub name: String,
    pub address: String,
    pub state: BackendState,
    pub health: String,
    pub weight: u32,
    pub active_flows: u64,
    #[serde(flatten)]
    pub rates: Rates,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceSample {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub active_flows: u64,
    #[serde(flatten)]
    pub rates: Rates,
    pub backends: Vec<BackendSample>,
}

/// One sample of the rates, what `lbctl top --once --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds between the two readings.
    pub interval_s: f64,
    pub interface: String,
    /// `master`, `backup`, `init`, `fault`, or `standalone` (no `[vrrp]`).
    pub vrrp_state: String,
    pub serving: bool,
    pub services: Vec<ServiceSample>,
    /// Packets not forwarded, per second, by reason: only the reasons that moved.
    pub not_forwarded_per_s: BTreeMap<String, f64>,
    /// Data-path events per second: only those that moved.
    pub events_per_s: BTreeMap<String, f64>,
}

/// Counters that moved, as rates. A counter that went back is left out.
fn moved(
    before: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    secs: f64,
) -> BTreeMap<String, f64> {
    now.iter()
        .filter_map(|(k, v)| {
            let r = rate(*before.get(k)?, *v, secs)?;
            (r > 0.0).then(|| (k.clone(), r))
        })
        .collect()
}

/// The rates between `before` and `now`, read `secs` apart. Services and backends are
/// matched by name; one that is new since `before` has no rates yet.
pub fn sample(before: &Status, now: &Status, secs: f64) -> Sample {
    let services = now
        .services
        .iter()
        .map(|s| {
            let old = before.services.iter().find(|o| o.name == s.name);
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    let old_b = old
                        .and_then(|o| o.backends.iter().find(|ob| ob.name == b.name))
                        .map(|ob| (ob.packets, ob.bytes, ob.new_flows));
                    BackendSample {
                        name: b.name.clone(),
                        address: b.address.clone(),
                        state: b.state,
                        health: b.health.clone(),
                        weight: b.weight,
                        active_flows: b.active_flows,
                        rates: Rates::between(old_b, (b.packets, b.bytes, b.new_flows), secs),
                    }
                })
                .collect::<Vec<_>>();
            ServiceSample {
                name: s.name.clone(),
                vip: s.vip.clone(),
                port: s.port,
                active_flows: backends.iter().map(|b| b.active_flows).sum(),
                rates: Rates::between(
                    old.map(|o| (o.packets, o.bytes, o.new_flows)),
                    (s.packets, s.bytes, s.new_flows),
                    secs,
                ),
                backends,
            }
        })
        .collect();
    Sample {
        interval_s: secs,
        interface: now.interface.clone(),
        vrrp_state: now
            .vrrp
            .as_ref()
            .map(|v| v.state.to_string())
            .unwrap_or_else(|| "standalone".to_string()),
        serving: now.serving,
        services,
        not_forwarded_per_s: moved(&before.counters, &now.counters, secs),
        events_per_s: moved(&before.events, &now.events, secs),
    }
}

/// A rate in few characters: `0`, `950`, `12.3k`, `4.56M`, `7.8G`; `-` when unknown.
pub fn si(value: Option<f64>) -> String {
    let Some(v) = value else {
        return "-".to_string();
    };
    let v = v.max(0.0);
    let (scaled, unit) = match v {
        v if v >= 1e12 => (v / 1e12, "T"),
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    if unit.is_empty() {
        if v < 10.0 && v.fract() != 0.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        }
    } else if scaled < 10.0 {
        format!("{scaled:.2}{unit}")
    } else if scaled < 100.0 {
        format!("{scaled:.1}{unit}")
    } else {
        format!("{scaled:.0}{unit}")
    }
}

/// The table's columns, in order: (header, least width, drop rank; see `Column`).
pub const COLUMNS: [(&str, u16, u8); 9] = [
    ("name", 8, 0),
    ("address", 15, 2),
    ("state", 5, 0),
    ("pkt/s", 6, 0),
    ("bit/s", 6, 0),
    ("new/s", 6, 0),
    ("active", 6, 0),
    ("weight", 6, 1),
    ("health", 10, 3),
];

/// Right-aligned columns: the numbers.
pub fn right_aligned(i: usize) -> bool {
    (3..=7).contains(&i)
}

/// The table's cells: one row per service (its VIP as the address; `true`), then its
/// backends indented (`false`), in `COLUMNS` order.
pub fn rows(sample: &Sample) -> Vec<(bool, Vec<String>)> {
    let mut rows = Vec::new();
    for s in &sample.services {
        let vip = if s.vip.contains(':') {
            format!("[{}]:{}", s.vip, s.port)
        } else {
            format!("{}:{}", s.vip, s.port)
        };
        rows.push((
            true,
            vec![
                s.name.clone(),
                vip,
                String::new(),
                si(s.rates.packets_per_s),
                si(s.rates.bits_per_s),
                si(s.rates.new_flows_per_s),
                s.active_flows.to_string(),
                String::new(),
                String::new(),
            ],
        ));
        for b in &s.backends {
            rows.push((
                false,
                vec![
                    format!("  {}", b.name),
                    b.address.clone(),
                    b.state.to_string(),
                    si(b.rates.packets_per_s),
                    si(b.rates.bits_per_s),
                    si(b.rates.new_flows_per_s),
                    b.active_flows.to_string(),
                    b.weight.to_string(),
                    b.health.clone(),
                ],
            ));
        }
    }
    rows
}

/// One column of the live view: its header, the width its widest cell wants, the
/// least it can be cut to, and how readily it goes when the terminal is narrow (the
/// highest `drop_rank` goes first; 0 never goes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub header: &'static str,
    pub natural: u16,
    pub min: u16,
    pub drop_rank: u8,
}

/// Widths for `columns` in `width` terminal columns, one space between columns:
/// `None` for a column left out. While the columns' wanted widths do not fit, the one
/// with the highest `drop_rank` goes (never a rank 0 one); then what still does not
/// fit is cut, least important first, each column down to its minimum.
pub fn fit(columns: &[Column], width: u16) -> Vec<Option<u16>> {
    let wanted = |c: &Column| c.natural.max(c.min);
    let total = |shown: &[bool]| -> u32 {
        let n = shown.iter().filter(|s| **s).count() as u32;
        columns
            .iter()
            .zip(shown)
            .filter(|(_, s)| **s)
            .map(|(c, _)| u32::from(wanted(c)))
            .sum::<u32>()
            + n.saturating_sub(1)
    };
    let mut shown: Vec<bool> = vec![true; columns.len()];
    while total(&shown) > u32::from(width) {
        let worst = columns
            .iter()
            .enumerate()
            .filter(|(i, c)| shown[*i] && c.drop_rank > 0)
            .max_by_key(|(i, c)| (c.drop_rank, *i));
        match worst {
            Some((i, _)) => shown[i] = false,
            None => break,
        }
    }
    let mut widths: Vec<u16> = columns.iter().map(wanted).collect();
    let mut excess = total(&shown).saturating_sub(u32::from(width));
    let mut order: Vec<usize> = (0..columns.len()).filter(|i| shown[*i]).collect();
    order.sort_by_key(|i| std::cmp::Reverse((columns[*i].drop_rank, *i)));
    for i in order {
        if excess == 0 {
            break;
        }
        let room = u32::from(widths[i].saturating_sub(columns[i].min));
        let cut = room.min(excess);
        widths[i] -= cut as u16;
        excess -= cut;
    }
    widths
        .into_iter()
        .zip(shown)
        .map(|(w, s)| s.then_some(w))
        .collect()
}

/// `text` in at most `width` characters, cut with `…` when longer.
pub fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut s: String = text.chars().take(width - 1).collect();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BackendStatus, FlowTableStatus, ServiceStatus};

    #[test]
    fn rates_from_deltas_resets_and_wraps() {
        assert_eq!(rate(100, 300, 2.0), Some(100.0));
        assert_eq!(rate(5, 5, 1.0), Some(0.0));
        // The maps were made anew: the counter went back. Unknown, not a huge number.
        assert_eq!(rate(1_000_000, 10, 1.0), None);
        // A u64 that wrapped past its maximum: the true difference.
        assert_eq!(rate(u64::MAX - 4, 10, 1.0), Some(15.0));
        assert_eq!(rate(1, 2, 0.0), None);
        assert_eq!(rate(1, 2, f64::NAN), None);
    }

    fn backend(name: &str, packets: u64, bytes: u64, new_flows: u64) -> BackendStatus {
        BackendStatus {
            service: "web".into(),
            name: name.into(),
            address: "2001:db8::21".into(),
            state: BackendState::Up,
            health: "up".into(),
            enabled: true,
            backup: false,
            weight: 100,
            config_weight: 100,
            in_ring: true,
            active_flows: 3,
            packets,
            bytes,
            new_flows,
        }
    }

    fn status(packets: u64, backends: Vec<BackendStatus>, fragments: u64) -> Status {
        let mut counters = BTreeMap::new();
        counters.insert("drop_fragment".to_string(), fragments);
        counters.insert("pass_not_vip".to_string(), 7);
        Status {
            version: "0".into(),
            interface: "eth0".into(),
            xdp_mode: "native".into(),
            uptime_s: 1,
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "192.0.2.10".into(),
                port: 80,
                packets,
                bytes: packets * 100,
                new_flows: packets / 10,
                persistence_timeout_s: 0,
                persistent_clients: 0,
                backends,
            }],
            counters,
            events: BTreeMap::new(),
            vrrp: None,
            serving: true,
            flows: FlowTableStatus::default(),
            sync: None,
            announce: None,
        }
    }

    #[test]
    fn a_sample_has_rates_per_service_backend_and_moving_reason() {
        let before = status(1000, vec![backend("b1", 400, 40_000, 40)], 2);
        let now = status(
            3000,
            vec![backend("b1", 1400, 140_000, 140), backend("new", 5, 500, 1)],
            6,
        );
        let s = sample(&before, &now, 2.0);
        assert_eq!(s.vrrp_state, "standalone");
        let web = &s.services[0];
        assert_eq!(web.rates.packets_per_s, Some(1000.0));
        assert_eq!(web.rates.bits_per_s, Some(800_000.0));
        assert_eq!(web.rates.new_flows_per_s, Some(100.0));
        assert_eq!(web.active_flows, 6);
        let b1 = &web.backends[0];
        assert_eq!(b1.rates.packets_per_s, Some(500.0));
        assert_eq!(b1.rates.bits_per_s, Some(400_000.0));
        assert_eq!(b1.rates.new_flows_per_s, Some(50.0));
        // A backend new since the first reading has no rates yet.
        assert_eq!(web.backends[1].rates, Rates::default());
        // Only the reasons that moved.
        assert_eq!(
            s.not_forwarded_per_s.into_iter().collect::<Vec<_>>(),
            vec![("drop_fragment".to_string(), 2.0)]
        );
        let json = serde_json::to_value(sample(&before, &now, 2.0)).unwrap();
        assert_eq!(json["services"][0]["backends"][0]["packets_per_s"], 500.0);
        assert_eq!(
            json["services"][0]["backends"][1]["packets_per_s"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn a_restarted_agent_with_new_maps_gives_unknown_rates_not_huge_ones() {
        let before = status(1_000_000, vec![backend("b1", 500_000, 1, 1)], 50);
        let now = status(10, vec![backend("b1", 4, 1, 1)], 0);
        let s = sample(&before, &now, 1.0);
        assert_eq!(s.services[0].rates.packets_per_s, None);
        assert_eq!(s.services[0].backends[0].rates.packets_per_s, None);
        assert!(s.not_forwarded_per_s.is_empty());
    }

    #[test]
    fn si_keeps_numbers_short() {
        assert_eq!(si(None), "-");
        assert_eq!(si(Some(0.0)), "0");
        assert_eq!(si(Some(0.5)), "0.5");
        assert_eq!(si(Some(950.0)), "950");
        assert_eq!(si(Some(1234.0)), "1.23k");
        assert_eq!(si(Some(12_345.0)), "12.3k");
        assert_eq!(si(Some(123_456.0)), "123k");
        assert_eq!(si(Some(9.87e9)), "9.87G");
        assert!(si(Some(1e15)).len() <= 6);
    }

    fn columns(name: u16, address: u16, health: u16) -> Vec<Column> {
        vec![
            Column {
                header: "name",
                natural: name,
                min: 8,
                drop_rank: 0,
            },
            Column {
                header: "address",
                natural: address,
                min: 7,
                drop_rank: 2,
            },
            Column {
                header: "state",
                natural: 8,
                min: 5,
                drop_rank: 0,
            },
            Column {
                header: "health",
                natural: health,
                min: 6,
                drop_rank: 3,
            },
            Column {
                header: "pkt/s",
                natural: 6,
                min: 6,
                drop_rank: 0,
            },
            Column {
                header: "bit/s",
                natural: 6,
                min: 6,
                drop_rank: 0,
            },
            Column {
                header: "new/s",
                natural: 6,
                min: 6,
                drop_rank: 0,
            },
            Column {
                header: "active",
                natural: 6,
                min: 6,
                drop_rank: 0,
            },
            Column {
                header: "weight",
                natural: 6,
                min: 6,
                drop_rank: 1,
            },
        ]
    }

    fn total(widths: &[Option<u16>]) -> u16 {
        let shown: Vec<u16> = widths.iter().flatten().copied().collect();
        shown.iter().sum::<u16>() + shown.len().saturating_sub(1) as u16
    }

    #[test]
    fn eighty_columns_fit_long_names_and_ipv6_addresses() {
        let cols = columns(40, 39, 30);
        let w = fit(&cols, 80);
        assert!(total(&w) <= 80, "{w:?} is {} wide", total(&w));
        // The numbers, the name and the state always stay.
        for (c, w) in cols.iter().zip(&w) {
            if c.drop_rank == 0 {
                assert!(
                    w.is_some_and(|w| w >= c.min),
                    "{} left out: {w:?}",
                    c.header
                );
            }
        }
        // Health goes first, then the address, then the weight.
        assert_eq!((w[3], w[1], w[8]), (None, None, None));
        // Shorter names and IPv4 addresses: only health goes.
        let w = fit(&columns(14, 15, 30), 80);
        assert_eq!(w.iter().filter(|w| w.is_none()).count(), 1, "{w:?}");
        assert_eq!((w[3], w[1]), (None, Some(15)));
        assert!(total(&w) <= 80);
    }

    #[test]
    fn wider_terminals_show_every_column_whole() {
        let cols = columns(40, 39, 30);
        let w = fit(&cols, 200);
        let natural: Vec<Option<u16>> = cols.iter().map(|c| Some(c.natural)).collect();
        assert_eq!(w, natural);
        // In between: what is shown is shown whole.
        let w = fit(&cols, 150);
        assert_eq!(w[3], None);
        assert_eq!((w[0], w[1]), (Some(40), Some(39)));
        assert!(total(&w) <= 150);
        // Short content at 80: everything fits as it is.
        let w = fit(&columns(10, 11, 10), 80);
        assert!(w.iter().all(Option::is_some), "{w:?}");
    }

    #[test]
    fn a_terminal_too_narrow_for_the_essentials_keeps_them_cut_to_their_minimum() {
        let cols = columns(40, 39, 30);
        let w = fit(&cols, 20);
        assert!(
            cols.iter()
                .zip(&w)
                .all(|(c, w)| (c.drop_rank == 0) == w.is_some())
        );
        assert_eq!(w[0], Some(8));
    }

    #[test]
    fn cut_marks_what_it_shortened() {
        assert_eq!(cut("backend-1", 20), "backend-1");
        assert_eq!(cut("a-very-long-backend", 8), "a-very-…");
        assert_eq!(cut("x", 0), "");
    }
}
