//! The systems under test as child processes: start, stop, and their
//! CPU and memory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::Result;

pub(crate) struct Child {
    pub(crate) child: std::process::Child,
    pub(crate) log: PathBuf,
}

/// A child left running by an error (a failed latency round) must not
/// load the machine during the next measurement.
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Child {
    pub(crate) fn spawn(command: &mut Command, log: &Path) -> Result<Child> {
        let file = std::fs::File::create(log).map_err(|e| e.to_string())?;
        command
            .env_remove("RUST_LOG")
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .stdin(Stdio::null());
        // SAFETY: prctl in the child before exec; it dies with the driver.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| e.to_string())?;
        Ok(Child {
            child,
            log: log.to_path_buf(),
        })
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until `check` yields, the child exits, or `limit` passes.
    pub(crate) fn wait<T>(
        &mut self,
        limit: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = check(self) {
                return Ok(value);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("child exited with {status}:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("not within {limit:?}; child log:\n{}", self.log()));
            }
            // Checks cost the broker requests (Tansu is single-threaded): 4/s.
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The address keyflight logged for its metrics endpoint.
    pub(crate) fn metrics_addr(&mut self) -> Result<String> {
        self.wait(Duration::from_secs(60), |c| {
            keyflight::metrics::scrape::served_addr(&c.log())
        })
    }

    /// Peak resident memory (VmHWM) in MB.
    pub(crate) fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// CPU time used so far (user + system), in seconds.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(&self.child.id().to_string())
    }

    /// SIGTERM, then a clean exit within a minute.
    pub(crate) fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait().map_err(|e| e.to_string())? {
                Some(status) if status.success() => return Ok(()),
                Some(status) => return Err(format!("child exited with {status}:\n{}", self.log())),
                None if Instant::now() > deadline => {
                    return Err(format!("child did not stop:\n{}", self.log()))
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// CPU time a process used so far (user + system), in seconds; `pid` may
/// be `self`.
pub(crate) fn process_cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th of the line, in clock ticks.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().skip(11).take(2))
        .into_iter()
        .flatten()
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_second as f64
}

/// The machine's CPU time so far, in clock ticks summed over its CPUs:
/// (busy, total), from the first line of `/proc/stat`.
pub(crate) fn machine_cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle: u64 = ticks.iter().skip(3).take(2).sum();
    (total - idle, total)
}
