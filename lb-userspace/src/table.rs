//! A small text table for lbctl: every column as wide as its widest cell, so IPv6
//! addresses and long names never push a row out of line.

/// How a column's cells sit in their width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Columns with headers, rows of cells, rendered with one space between columns.
#[derive(Clone, Debug)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
    indent: usize,
}

/// Width of a cell as a terminal shows it (one column per character here: names and
/// addresses are ASCII in practice, and a wide character only widens its own column).
pub fn text_width(s: &str) -> usize {
    s.chars().count()
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Self {
            columns: columns.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
            indent: 0,
        }
    }

    /// Spaces before every line.
    pub fn indent(mut self, spaces: usize) -> Self {
        self.indent = spaces;
        self
    }

    /// A row; missing cells are empty, extra cells are ignored.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.columns.len(), String::new());
        self.rows.push(row);
    }

    /// Each column's width: its widest cell or header.
    pub fn widths(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, (header, _))| {
                self.rows
                    .iter()
                    .map(|r| text_width(&r[i]))
                    .chain([text_width(header)])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The header line and the rows, each line ending in a newline, no trailing spaces.
    pub fn render(&self) -> String {
        let widths = self.widths();
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.clone()).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = " ".repeat(self.indent);
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push(' ');
                }
                let pad = " ".repeat(widths[i].saturating_sub(text_width(cell)));
                match self.columns[i].1 {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(&[
            ("backend", Align::Left),
            ("address", Align::Left),
            ("packets", Align::Right),
        ]);
        t.row(["b1", "10.0.0.1", "5"]);
        t.row([
            "a-rather-long-backend-name",
            "2001:db8:ffff:ffff::1234",
            "1234567",
        ]);
        t
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        assert_eq!(sample().widths(), vec![26, 24, 7]);
    }

    #[test]
    fn long_cells_keep_every_row_in_line() {
        let text = sample().indent(2).render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        // Every column starts at the same offset on every line.
        let addr_at = lines[0].find("address").unwrap();
        assert_eq!(lines[1].find("10.0.0.1"), Some(addr_at));
        assert_eq!(lines[2].find("2001:db8"), Some(addr_at));
        // Right-aligned numbers end together.
        assert!(lines.iter().all(|l| l.len() == lines[2].len()));
        assert!(lines[1].ends_with("      5"));
        assert!(lines[0].starts_with("  backend "));
    }

    #[test]
    fn no_trailing_spaces_and_short_rows_are_padded() {
        let mut t = Table::new(&[("a", Align::Left), ("b", Align::Left)]);
        t.row(["x"]);
        t.row(["longer", ""]);
        let text = t.render();
        assert!(text.lines().all(|l| !l.ends_with(' ')), "{text:?}");
        assert_eq!(text, "a      b\nx\nlonger\n");
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        assert_eq!(text_width("café"), 4);
        let mut t = Table::new(&[("name", Align::Left), ("n", Align::Right)]);
        t.row(["café", "1"]);
        assert_eq!(t.widths(), vec![4, 1]);
    }
}
