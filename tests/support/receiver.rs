//! `keyflight receive` as a child process, for the receiver's own tests
//! and the HTTP sink's.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keyflight::receive::{Stats, STATS_PATH};

use super::{dies_with_tests, keyflight};

/// A `keyflight receive` child process; killed on drop if still running.
pub struct Running {
    child: Child,
    /// `http://ADDR` or `https://ADDR`.
    pub url: String,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<String>>,
}

/// What a stopped receiver printed after its listening line.
pub struct Stopped {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Starts `keyflight receive --listen 127.0.0.1:0 ARGS` and reads its
/// address from the first stdout line.
pub fn start_receiver(args: &[&str]) -> Running {
    let mut command = keyflight();
    command
        .args(["receive", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    dies_with_tests(&mut command);
    let mut child = command.spawn().expect("keyflight receive starts");
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let Some(url) = line.trim_end().strip_prefix("listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "first stdout line {line:?}, stderr:\n{}",
            stderr.join().unwrap()
        );
    };
    Running {
        url: url.to_string(),
        child,
        stdout,
        stderr: Some(stderr),
    }
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn stats(&self, client: &reqwest::Client) -> Stats {
        let response = client.get(self.url(STATS_PATH)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }

    /// Polls the stats until `done` holds (10 s at most).
    pub async fn wait_for(&self, client: &reqwest::Client, done: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.stats(client).await;
            if done(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "stats never got there: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGTERM, then everything it printed until it exited.
    pub fn stop(&mut self) -> Stopped {
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let mut stdout = String::new();
        self.stdout.read_to_string(&mut stdout).unwrap();
        let status = self.child.wait().unwrap();
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        Stopped {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
