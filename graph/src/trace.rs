//! Step statistics (`RunMetadata.step_stats`): per-node start and end times, and their export as
//! a Chrome / Perfetto trace (`chrome://tracing`, ui.perfetto.dev).

use crate::kernel::NodeInfo;
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// One node execution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeExecStats {
    pub node: String,
    pub op: String,
    pub device: String,
    /// Microseconds since the Unix epoch.
    pub start_us: u64,
    pub end_us: u64,
    pub thread: String,
}

fn epoch_us(t: Instant) -> u64 {
    // Instants are converted through one process-wide anchor so all stats share a clock.
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (i0, us0) = *ANCHOR.get_or_init(|| {
        let us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        (Instant::now(), us)
    });
    if t >= i0 {
        us0 + (t - i0).as_micros() as u64
    } else {
        us0.saturating_sub((i0 - t).as_micros() as u64)
    }
}

impl NodeExecStats {
    pub fn new(info: &NodeInfo, start: Instant, end: Instant) -> NodeExecStats {
        let th = std::thread::current();
        NodeExecStats {
            node: info.name.clone(),
            op: info.op.clone(),
            device: String::new(),
            start_us: epoch_us(start),
            end_us: epoch_us(end),
            thread: th.name().map(|s| s.to_string()).unwrap_or_else(|| format!("{:?}", th.id())),
        }
    }
}

/// Collects the node stats of one partition of one step.
#[derive(Debug)]
pub struct StepStatsCollector {
    device: String,
    nodes: Mutex<Vec<NodeExecStats>>,
}

impl StepStatsCollector {
    pub fn new(device: &str) -> StepStatsCollector {
        StepStatsCollector { device: device.to_string(), nodes: Mutex::new(Vec::new()) }
    }

    pub fn record(&self, mut s: NodeExecStats) {
        s.device = self.device.clone();
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    pub fn take(&self) -> Vec<NodeExecStats> {
        std::mem::take(&mut *self.nodes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The stats of a step, over all devices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub nodes: Vec<NodeExecStats>,
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

impl StepStats {
    /// The Chrome trace-event JSON: one process per device, one thread row per OS thread,
    /// one complete event (`"ph":"X"`) per node.
    pub fn to_chrome_trace(&self) -> String {
        let mut devices: Vec<&str> = self.nodes.iter().map(|n| n.device.as_str()).collect();
        devices.sort_unstable();
        devices.dedup();
        let mut threads: Vec<&str> = self.nodes.iter().map(|n| n.thread.as_str()).collect();
        threads.sort_unstable();
        threads.dedup();
        let t0 = self.nodes.iter().map(|n| n.start_us).min().unwrap_or(0);
        let mut ev = Vec::new();
        for (pid, d) in devices.iter().enumerate() {
            ev.push(format!(
                r#"{{"name":"process_name","ph":"M","pid":{pid},"args":{{"name":{}}}}}"#,
                json_str(d)
            ));
        }
        for n in &self.nodes {
            let pid = devices.iter().position(|d| *d == n.device).unwrap_or(0);
            let tid = threads.iter().position(|t| *t == n.thread).unwrap_or(0);
            ev.push(format!(
                r#"{{"name":{},"cat":"Op","ph":"X","pid":{pid},"tid":{tid},"ts":{},"dur":{},"args":{{"name":{},"op":{}}}}}"#,
                json_str(&n.op),
                n.start_us - t0,
                n.end_us.saturating_sub(n.start_us).max(1),
                json_str(&n.node),
                json_str(&n.op)
            ));
        }
        format!("{{\"traceEvents\":[\n{}\n]}}\n", ev.join(",\n"))
    }

    /// Writes the Chrome trace to `path`.
    pub fn write_chrome_trace(&self, path: &std::path::Path) -> crate::Result<()> {
        std::fs::write(path, self.to_chrome_trace())?;
        Ok(())
    }
}
