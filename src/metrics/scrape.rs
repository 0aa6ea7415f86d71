//! Reading the endpoint from outside: a plain HTTP GET and a parser of the
//! Prometheus text format, for tests, the benchmark driver and tools that
//! watch a running processor.

use std::collections::BTreeMap;
use std::time::Duration;

/// The metrics address a `keyflight run` logged (its text-format
/// `serving /metrics ... addr=HOST:PORT` line), for tools that start it with
/// port 0.
pub fn served_addr(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

/// A plain HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Prometheus text as `name{labels}` → value (labels as exposed, sorted by
/// the encoder), plus helpers to sum a family.
pub struct Scrape(pub BTreeMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// Sum over the series of `name` whose labels contain every `label="value"` in `having`.
    pub fn sum(&self, name: &str, having: &[&str]) -> f64 {
        self.series(name, having).map(|(_, v)| v).sum()
    }

    pub fn series<'a>(
        &'a self,
        name: &'a str,
        having: &'a [&'a str],
    ) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.iter().filter_map(move |(series, value)| {
            let labels = match series.strip_prefix(name)? {
                "" => "",
                rest => rest.strip_prefix('{')?.strip_suffix('}')?,
            };
            having
                .iter()
                .all(|h| labels.split(',').any(|l| l == *h))
                .then_some((labels, *value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_filter_by_name_and_labels() {
        let text = "# TYPE a_total counter\na_total{kind=\"x\",partition=\"0\"} 2\n\
                    a_total{kind=\"y\",partition=\"1\"} 3\nab_total 9\nb 1.5\n";
        let scrape = Scrape::parse(text);
        assert_eq!(scrape.sum("a_total", &[]), 5.0);
        assert_eq!(scrape.sum("a_total", &["kind=\"y\""]), 3.0);
        assert_eq!(scrape.sum("b", &[]), 1.5);
        assert_eq!(scrape.series("missing", &[]).count(), 0);
    }
}
