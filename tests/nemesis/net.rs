//! Real network partitions: each node runs in its own network namespace with its own address on
//! a bridge of veth pairs; a link is cut with a blackhole route in the sender's namespace
//! (iproute2 only; this kernel has no tc qdiscs or netfilter to drop packets otherwise).
//! Needs root. The test process (the clients) stays in the root namespace and reaches every
//! node through the bridge.

use std::collections::BTreeSet;
use std::process::Command;

pub struct Net {
    pub prefix: String,
    pub subnet: u8,
    pub n: usize,
    cut: BTreeSet<(usize, usize)>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Creates namespaces `<prefix>n<i>` with address `198.18.<subnet>.<i>` (198.18.0.0/15 is
    /// reserved for network benchmark tests; nothing here is routed off the bridge).
    pub fn create(n: usize) -> Result<Net, String> {
        cleanup_stale();
        let pid = std::process::id();
        let net = Net {
            prefix: format!("rkv{pid}"),
            subnet: (pid % 250) as u8 + 1,
            n,
            cut: BTreeSet::new(),
        };
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("198.18.{}.254/24", net.subnet),
            "dev",
            &br,
        ])?;
        for i in 1..=n {
            let ns = net.ns(i);
            let veth = format!("{}v{i}", net.prefix);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &br, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    pub fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    pub fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    pub fn addr(&self, i: usize) -> String {
        format!("198.18.{}.{i}", self.subnet)
    }

    /// Stops traffic from `from` to `to` (one way).
    pub fn cut(&mut self, from: usize, to: usize) {
        if self.cut.insert((from, to)) {
            let _ = ip(&[
                "-n",
                &self.ns(from),
                "route",
                "add",
                "blackhole",
                &format!("{}/32", self.addr(to)),
            ]);
        }
    }

    pub fn heal(&mut self) {
        for (from, to) in std::mem::take(&mut self.cut) {
            let _ = ip(&[
                "-n",
                &self.ns(from),
                "route",
                "del",
                "blackhole",
                &format!("{}/32", self.addr(to)),
            ]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.n {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// Removes namespaces and bridges left behind by runs whose process is gone.
fn cleanup_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("rkv") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('n') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
            let _ = ip(&["link", "del", &format!("rkv{pid}br")]);
        }
    }
}
