//! BIRD in a routed lab (`LabBuilder::routed`): the router's and each LB host's daemon,
//! run from the configs the project ships (`config/bird-router.conf`,
//! `config/bird-lb.conf`) with only their `define` lines set to the lab's values, so
//! the files users copy are the files tested. And the router's kernel route to a VIP,
//! which is where ECMP happens.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{
    LBCTL_TIMEOUT, Lab, Node, ROUTED_VIPS4, addr4,
    processes::{ProcessGuard, run_bounded},
};

/// The LB host's BIRD config as shipped.
pub const BIRD_LB_CONF: &str = include_str!("../../../config/bird-lb.conf");
/// The router's BIRD config as shipped.
pub const BIRD_ROUTER_CONF: &str = include_str!("../../../config/bird-router.conf");

/// The lab's AS numbers: the router's, and every LB host's.
const ROUTER_AS: u32 = 65000;
const LB_AS: u32 = 65001;
/// How long a starting BIRD may take to answer `birdc show status`.
const BIRD_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the router's route is read (`Lab::wait_next_hops`).
const ROUTE_POLL: Duration = Duration::from_millis(5);

/// `template` with the value of each `define NAME = ...;` line named in `values`
/// replaced (the comment after it is kept). Fails if a name has no such line.
pub fn set_defines(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut found = vec![false; values.len()];
    let mut out = String::with_capacity(template.len());
    for line in template.split_inclusive('\n') {
        let name = line
            .strip_prefix("define ")
            .and_then(|rest| rest.split('=').next())
            .map(str::trim);
        match name.and_then(|n| values.iter().position(|(v, _)| *v == n)) {
            Some(i) => {
                found[i] = true;
                let comment = line.find('#').map(|at| &line[at..]).unwrap_or("\n");
                let (n, v) = &values[i];
                out += &format!("define {n} = {v};  {comment}");
                if !comment.ends_with('\n') {
                    out.push('\n');
                }
            }
            None => out += line,
        }
    }
    for ((name, _), found) in values.iter().zip(found) {
        ensure!(found, "the template has no `define {name} = ...;` line");
    }
    Ok(out)
}

/// A running BIRD; `Drop` stops it (by its pid).
pub struct BirdGuard<'lab> {
    process: ProcessGuard<'lab>,
    socket: PathBuf,
    node: Node,
}

impl BirdGuard<'_> {
    /// `birdc -s SOCKET ARGS`, bounded; its stdout. The control socket is a file: birdc
    /// runs in the root namespace, as lbctl does.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("birdc");
        cmd.arg("-s").arg(&self.socket).args(args);
        let out = run_bounded(cmd, LBCTL_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "birdc {args:?} in {:?} failed: {}",
            self.node,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What BIRD logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn node(&self) -> Node {
        self.node
    }
}

impl Lab {
    /// The shipped LB host config for `node` (an LB host): its address, the router's,
    /// the lab's AS numbers, and `table` (the agent's `[announce] table`).
    pub fn bird_lb_config(&self, node: Node, table: u32) -> Result<String> {
        ensure!(self.lbs().contains(&node), "{node:?} is not an LB host");
        set_defines(
            BIRD_LB_CONF,
            &[
                ("LB_ADDRESS", addr4(node).to_string()),
                ("ROUTER_ADDRESS", addr4(Node::Router).to_string()),
                ("LB_AS", LB_AS.to_string()),
                ("ROUTER_AS", ROUTER_AS.to_string()),
                ("ANNOUNCE_TABLE", table.to_string()),
            ],
        )
    }

    /// The shipped router config: LB hosts may peer from the bridge's subnet and
    /// announce host routes of `ROUTED_VIPS4`.
    pub fn bird_router_config(&self) -> Result<String> {
        set_defines(
            BIRD_ROUTER_CONF,
            &[
                ("ROUTER_ADDRESS", addr4(Node::Router).to_string()),
                ("ROUTER_AS", ROUTER_AS.to_string()),
                ("LB_AS", LB_AS.to_string()),
                ("LB_HOSTS", "10.77.0.0/24".to_string()),
                ("VIPS", format!("[ {ROUTED_VIPS4}{{32,32}} ]")),
            ],
        )
    }

    /// Starts `bird -f -c FILE -s SOCKET -P PIDFILE` in `node`'s namespace with
    /// `config` (logging to its log file) and waits until `birdc` answers.
    pub fn spawn_bird(&self, node: Node, config: &str) -> Result<BirdGuard<'_>> {
        ensure!(
            self.routed,
            "BIRD runs in a routed lab (LabBuilder::routed)"
        );
        let stem = format!("bird-{}", node.short_name());
        let conf = self.new_file(&stem, "conf");
        std::fs::write(&conf, format!("{config}\nlog stderr all;\n"))
            .with_context(|| format!("writing {}", conf.display()))?;
        let socket = self.dir().join(format!("{stem}.ctl"));
        let pidfile = self.dir().join(format!("{stem}.pid"));
        let mut args: Vec<String> = vec!["bird".into(), "-f".into(), "-c".into()];
        args.push(conf.display().to_string());
        args.extend(["-s".into(), socket.display().to_string()]);
        args.extend(["-P".into(), pidfile.display().to_string()]);
        let mut bird = BirdGuard {
            process: self.spawn(node, &args)?,
            socket,
            node,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = bird.process.exited() {
                bail!("bird in {node:?} exited ({status}):\n{}", bird.log());
            }
            if bird
                .birdc(&["show", "status"])
                .is_ok_and(|s| s.contains("Daemon is up"))
            {
                return Ok(bird);
            }
            if start.elapsed() > BIRD_START_TIMEOUT {
                bail!(
                    "bird in {node:?} did not answer within {BIRD_START_TIMEOUT:?}:\n{}",
                    bird.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The next hops of `node`'s kernel route to `dest` (main table), sorted; empty
    /// when it has none.
    pub fn next_hops(&self, node: Node, dest: IpAddr) -> Result<Vec<IpAddr>> {
        let out = self.run(
            node,
            &["ip", "-j", "route", "show", "exact", &dest.to_string()],
        )?;
        parse_next_hops(&out)
    }

    /// Polls the router's route to `vip` (every 5 ms) until its next hops are exactly
    /// the addresses of `lbs`; returns how long that took. Fails after `timeout` with
    /// what the router had.
    pub fn wait_next_hops(&self, vip: IpAddr, lbs: &[Node], timeout: Duration) -> Result<Duration> {
        let mut want: Vec<IpAddr> = lbs.iter().map(|n| IpAddr::V4(addr4(*n))).collect();
        want.sort();
        let start = Instant::now();
        loop {
            let hops = self.next_hops(Node::Router, vip)?;
            if hops == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the router's route to {vip}: next hops {hops:?}, not {want:?} within {timeout:?}\n{}",
                    self.run(Node::Router, &["ip", "route"]).unwrap_or_default()
                );
            }
            thread::sleep(ROUTE_POLL);
        }
    }
}

/// The next hops in `ip -j route show` output: a route's `gateway`, or each `gateway` of
/// its `nexthops`.
fn parse_next_hops(json: &str) -> Result<Vec<IpAddr>> {
    let routes: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("ip -j route: {json:?}"))?;
    let mut hops = Vec::new();
    for route in routes.as_array().into_iter().flatten() {
        let gateways = match route.get("nexthops").and_then(|n| n.as_array()) {
            Some(list) => list.iter().filter_map(|h| h.get("gateway")).collect(),
            None => route.get("gateway").into_iter().collect::<Vec<_>>(),
        };
        for g in gateways {
            let text = g.as_str().context("a gateway that is not a string")?;
            hops.push(text.parse().with_context(|| format!("gateway {text:?}"))?);
        }
    }
    hops.sort();
    Ok(hops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defines_are_set_and_the_rest_is_kept() -> Result<()> {
        let text = "# head\ndefine A = 1;   # the a\ndefine B = 2;\nrouter id A;\n";
        let out = set_defines(text, &[("A", "10".into()), ("B", "x".into())])?;
        assert_eq!(
            out,
            "# head\ndefine A = 10;  # the a\ndefine B = x;  \nrouter id A;\n"
        );
        assert!(set_defines(text, &[("C", "1".into())]).is_err());
        Ok(())
    }

    #[test]
    fn the_shipped_configs_have_the_defines_the_lab_sets() -> Result<()> {
        for (text, names) in [
            (
                BIRD_LB_CONF,
                &[
                    "LB_ADDRESS",
                    "ROUTER_ADDRESS",
                    "LB_AS",
                    "ROUTER_AS",
                    "ANNOUNCE_TABLE",
                ][..],
            ),
            (
                BIRD_ROUTER_CONF,
                &["ROUTER_ADDRESS", "ROUTER_AS", "LB_AS", "LB_HOSTS", "VIPS"][..],
            ),
        ] {
            let values: Vec<(&str, String)> = names.iter().map(|n| (*n, "0".into())).collect();
            set_defines(text, &values)?;
        }
        Ok(())
    }

    #[test]
    fn next_hops_of_one_and_of_many() -> Result<()> {
        let one = r#"[{"dst":"10.99.0.100","gateway":"10.77.0.3","dev":"eth0","protocol":"bird","flags":[]}]"#;
        assert_eq!(parse_next_hops(one)?, vec!["10.77.0.3".parse::<IpAddr>()?]);
        let many = r#"[{"dst":"10.99.0.100","protocol":"bird","flags":[],"nexthops":[{"gateway":"10.77.0.4","dev":"eth0","weight":1,"flags":[]},{"gateway":"10.77.0.3","dev":"eth0","weight":1,"flags":[]}]}]"#;
        assert_eq!(
            parse_next_hops(many)?,
            vec!["10.77.0.3".parse::<IpAddr>()?, "10.77.0.4".parse()?]
        );
        assert!(parse_next_hops("[]")?.is_empty());
        Ok(())
    }
}
