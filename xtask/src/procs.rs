//! Process handling shared by `demo` and `cluster-test`: where cargo puts the binaries, free
//! loopback ports, children that are killed (by their own handles) when dropped, and
//! `key=value` fields of output lines.

use std::path::{Path, PathBuf};
use std::process::Child;

/// Cargo's target directory for this workspace: `CARGO_TARGET_DIR` when set, else `root/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    let t = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    if t.is_absolute() {
        t
    } else {
        root.join(t)
    }
}

/// Free loopback ports, all different: the listeners are held until every port is chosen, so
/// the OS cannot offer one port twice.
pub fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}")))
        .collect::<Result<_, _>>()?;
    ls.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())).collect()
}

/// Named children that are killed when this value is dropped, whatever happened.
pub struct Tasks(pub Vec<(String, Child)>);

impl Tasks {
    /// Kills the child named `name` (SIGKILL) and reaps it; `false` when there is none.
    pub fn kill(&mut self, name: &str) -> bool {
        let Some(k) = self.0.iter().position(|(n, _)| n == name) else { return false };
        let (_, mut c) = self.0.remove(k);
        let _ = c.kill();
        let _ = c.wait();
        true
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The value of `key=value` in a whitespace-separated line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
