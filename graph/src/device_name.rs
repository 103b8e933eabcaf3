//! Device names (`/job:ps/replica:0/task:1/device:GPU:0`): parsing, partial specs and merging.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A full or partial device name; `None` fields are unspecified and match anything.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceName {
    pub job: Option<String>,
    pub replica: Option<u32>,
    pub task: Option<u32>,
    /// Upper-case device type: `CPU`, `GPU`.
    pub device_type: Option<String>,
    pub id: Option<u32>,
}

fn parse_num(what: &str, v: &str, full: &str) -> Result<Option<u32>> {
    if v == "*" {
        return Ok(None);
    }
    v.parse::<u32>()
        .map(Some)
        .map_err(|_| Error::invalid_argument(format!("bad {what} '{v}' in device name '{full}'")))
}

impl DeviceName {
    /// Parses a full or partial name; the empty string is the unspecified device.
    pub fn parse(s: &str) -> Result<DeviceName> {
        let mut d = DeviceName::default();
        let t = s.trim();
        if t.is_empty() {
            return Ok(d);
        }
        let bad = || Error::invalid_argument(format!("malformed device name '{s}'"));
        let body = t.strip_prefix('/').unwrap_or(t);
        for part in body.split('/') {
            let (k, v) = part.split_once(':').ok_or_else(bad)?;
            match k {
                "job" => {
                    if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                        return Err(bad());
                    }
                    d.job = Some(v.to_string());
                }
                "replica" => d.replica = parse_num("replica", v, s)?,
                "task" => d.task = parse_num("task", v, s)?,
                "device" => {
                    let (ty, id) = match v.split_once(':') {
                        Some((ty, id)) => (ty, parse_num("device id", id, s)?),
                        None => (v, None),
                    };
                    if ty.is_empty() || !ty.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(bad());
                    }
                    d.device_type = Some(ty.to_ascii_uppercase());
                    d.id = id;
                }
                "cpu" | "gpu" | "CPU" | "GPU" => {
                    d.device_type = Some(k.to_ascii_uppercase());
                    d.id = parse_num("device id", v, s)?;
                }
                _ => return Err(bad()),
            }
        }
        Ok(d)
    }

    /// A full name of a local device: `/job:localhost/replica:0/task:0/device:TYPE:ID`.
    pub fn local(device_type: &str, id: u32) -> DeviceName {
        DeviceName::full("localhost", 0, device_type, id)
    }

    pub fn full(job: &str, task: u32, device_type: &str, id: u32) -> DeviceName {
        DeviceName {
            job: Some(job.to_string()),
            replica: Some(0),
            task: Some(task),
            device_type: Some(device_type.to_string()),
            id: Some(id),
        }
    }

    pub fn is_unspecified(&self) -> bool {
        *self == DeviceName::default()
    }

    pub fn is_full(&self) -> bool {
        self.job.is_some()
            && self.replica.is_some()
            && self.task.is_some()
            && self.device_type.is_some()
            && self.id.is_some()
    }

    /// Whether every field set here equals the same field of `full`.
    pub fn matches(&self, full: &DeviceName) -> bool {
        fn ok<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            a.as_ref().is_none_or(|a| b.as_ref() == Some(a))
        }
        ok(&self.job, &full.job)
            && ok(&self.replica, &full.replica)
            && ok(&self.task, &full.task)
            && ok(&self.device_type, &full.device_type)
            && ok(&self.id, &full.id)
    }

    /// The combination of two specs; conflicting fields are an `InvalidArgument` error.
    pub fn merge(&self, other: &DeviceName) -> Result<DeviceName> {
        fn m<T: Clone + PartialEq + fmt::Debug>(
            a: &Option<T>,
            b: &Option<T>,
            what: &str,
        ) -> Result<Option<T>> {
            match (a, b) {
                (Some(x), Some(y)) if x != y => {
                    Err(Error::invalid_argument(format!("conflicting {what}: {x:?} and {y:?}")))
                }
                (Some(x), _) => Ok(Some(x.clone())),
                (None, y) => Ok(y.clone()),
            }
        }
        Ok(DeviceName {
            job: m(&self.job, &other.job, "jobs")?,
            replica: m(&self.replica, &other.replica, "replicas")?,
            task: m(&self.task, &other.task, "tasks")?,
            device_type: m(&self.device_type, &other.device_type, "device types")?,
            id: m(&self.id, &other.id, "device ids")?,
        })
    }

    /// `other`'s fields override this one's where set (an inner device scope over an outer one).
    pub fn override_with(&self, other: &DeviceName) -> DeviceName {
        DeviceName {
            job: other.job.clone().or_else(|| self.job.clone()),
            replica: other.replica.or(self.replica),
            task: other.task.or(self.task),
            device_type: other.device_type.clone().or_else(|| self.device_type.clone()),
            id: other.id.or(self.id),
        }
    }

    /// The task part only (`/job:ps/replica:0/task:1`).
    pub fn task_name(&self) -> DeviceName {
        DeviceName { job: self.job.clone(), replica: self.replica, task: self.task, ..Default::default() }
    }

    /// The same job, replica and task.
    pub fn same_task(&self, other: &DeviceName) -> bool {
        self.job == other.job && self.replica == other.replica && self.task == other.task
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(j) = &self.job {
            write!(f, "/job:{j}")?;
        }
        if let Some(r) = self.replica {
            write!(f, "/replica:{r}")?;
        }
        if let Some(t) = self.task {
            write!(f, "/task:{t}")?;
        }
        if let Some(ty) = &self.device_type {
            write!(f, "/device:{ty}:")?;
            match self.id {
                Some(i) => write!(f, "{i}")?,
                None => write!(f, "*")?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl std::str::FromStr for DeviceName {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceName> {
        DeviceName::parse(s)
    }
}
