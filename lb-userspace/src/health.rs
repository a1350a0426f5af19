//! Backend health: the rise/fall state machine (pure) and the TCP connect check.

use std::{fmt, net::SocketAddr, time::Duration};

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Passed,
    Refused,
    Timeout,
    Unreachable,
    Error(String),
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Passed => f.write_str("passed"),
            CheckResult::Refused => f.write_str("refused"),
            CheckResult::Timeout => f.write_str("timeout"),
            CheckResult::Unreachable => f.write_str("unreachable"),
            CheckResult::Error(e) => write!(f, "error: {e}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No check has finished yet.
    Unknown,
    Up,
    Down,
}

/// A change of verdict, with the check that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Verdict,
    pub to: Verdict,
    pub cause: CheckResult,
}

/// Rise/fall hysteresis: `fall` failures in a row take a backend down, `rise` passes in
/// a row bring it up. The first result decides an unknown backend at once.
#[derive(Clone, Debug)]
pub struct Health {
    verdict: Verdict,
    streak: u32,
    rise: u32,
    fall: u32,
    last: Option<CheckResult>,
}

impl Health {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            verdict: Verdict::Unknown,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
            last: None,
        }
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    pub fn is_up(&self) -> bool {
        self.verdict == Verdict::Up
    }

    pub fn last(&self) -> Option<&CheckResult> {
        self.last.as_ref()
    }

    pub fn observe(&mut self, result: CheckResult) -> Option<Transition> {
        let passed = result == CheckResult::Passed;
        self.last = Some(result.clone());
        let from = self.verdict;
        let to = match (from, passed) {
            (Verdict::Unknown, true) => Verdict::Up,
            (Verdict::Unknown, false) => Verdict::Down,
            (Verdict::Up, true) | (Verdict::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Verdict::Up, false) => {
                self.streak += 1;
                if self.streak < self.fall {
                    return None;
                }
                Verdict::Down
            }
            (Verdict::Down, true) => {
                self.streak += 1;
                if self.streak < self.rise {
                    return None;
                }
                Verdict::Up
            }
        };
        self.verdict = to;
        self.streak = 0;
        Some(Transition {
            from,
            to,
            cause: result,
        })
    }
}

/// One TCP connect check: passed if the handshake completes within `timeout`.
pub async fn check_tcp(target: SocketAddr, timeout: Duration) -> CheckResult {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Err(_) => CheckResult::Timeout,
        Ok(Ok(_stream)) => CheckResult::Passed,
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => CheckResult::Refused,
            std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                CheckResult::Unreachable
            }
            std::io::ErrorKind::TimedOut => CheckResult::Timeout,
            _ => CheckResult::Error(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides() {
        let mut h = Health::new(2, 3);
        assert_eq!(h.verdict(), Verdict::Unknown);
        let t = h.observe(CheckResult::Refused).expect("transition");
        assert_eq!((t.from, t.to), (Verdict::Unknown, Verdict::Down));
        let mut h = Health::new(2, 3);
        assert_eq!(
            h.observe(CheckResult::Passed).map(|t| t.to),
            Some(Verdict::Up)
        );
    }

    #[test]
    fn fall_failures_in_a_row_take_it_down() {
        let mut h = Health::new(2, 3);
        h.observe(CheckResult::Passed);
        assert_eq!(h.observe(CheckResult::Timeout), None);
        assert_eq!(h.observe(CheckResult::Timeout), None);
        // A pass in between resets the count.
        assert_eq!(h.observe(CheckResult::Passed), None);
        assert_eq!(h.observe(CheckResult::Refused), None);
        assert_eq!(h.observe(CheckResult::Refused), None);
        let t = h.observe(CheckResult::Unreachable).expect("down after 3");
        assert_eq!(
            t,
            Transition {
                from: Verdict::Up,
                to: Verdict::Down,
                cause: CheckResult::Unreachable
            }
        );
        assert!(!h.is_up());
    }

    #[test]
    fn rise_passes_in_a_row_bring_it_up() {
        let mut h = Health::new(2, 3);
        h.observe(CheckResult::Refused);
        assert_eq!(h.observe(CheckResult::Passed), None);
        assert_eq!(h.observe(CheckResult::Refused), None);
        assert_eq!(h.observe(CheckResult::Passed), None);
        assert_eq!(
            h.observe(CheckResult::Passed).map(|t| t.to),
            Some(Verdict::Up)
        );
        assert_eq!(h.last(), Some(&CheckResult::Passed));
    }

    #[test]
    fn rise_and_fall_of_one_flip_at_once() {
        let mut h = Health::new(1, 1);
        h.observe(CheckResult::Passed);
        assert_eq!(
            h.observe(CheckResult::Refused).map(|t| t.to),
            Some(Verdict::Down)
        );
        assert_eq!(
            h.observe(CheckResult::Passed).map(|t| t.to),
            Some(Verdict::Up)
        );
    }

    #[tokio::test]
    async fn checks_classify_outcomes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = listener.local_addr().expect("addr");
        assert_eq!(
            check_tcp(open, Duration::from_secs(2)).await,
            CheckResult::Passed
        );
        drop(listener);
        assert_eq!(
            check_tcp(open, Duration::from_secs(2)).await,
            CheckResult::Refused
        );
    }
}
