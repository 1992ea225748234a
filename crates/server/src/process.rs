//! The process metrics Prometheus expects of every server
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, open and
//! allowed file descriptors, start time), read from `/proc` at each scrape.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// Reads `/proc/self` when scraped; on a system without it, shows nothing.
#[derive(Debug, Default)]
pub(crate) struct ProcessCollector;

/// What `/proc/self` says.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    start_time_seconds: Option<i64>,
    open_fds: i64,
    max_fds: Option<i64>,
}

impl Sample {
    fn read() -> Option<Sample> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Hidden by systemd's ProcSubset=pid: then there is no start time.
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<i64>().ok())
        });
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
        let ticks = rustix::param::clock_ticks_per_second();
        let page = rustix::param::page_size();
        let mut sample = parse_stat(&stat, ticks, page, boot_time)?;
        // The directory's own descriptor, open while it is read, is not counted.
        sample.open_fds = i64::try_from(open_fds.saturating_sub(1)).unwrap_or(i64::MAX);
        sample.max_fds = parse_max_fds(&limits);
        Some(sample)
    }
}

/// `/proc/self/stat`: the fields after the command name (which may hold
/// spaces and parentheses) are counted from its closing parenthesis.
fn parse_stat(stat: &str, ticks: u64, page: usize, boot_time: Option<i64>) -> Option<Sample> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field n of proc(5) is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = ticks.max(1) as f64;
    let cpu_seconds = (field(14)? + field(15)?) as f64 / ticks;
    let start = (field(22)? as f64 / ticks) as i64;
    let page = u64::try_from(page).ok()?;
    Some(Sample {
        cpu_seconds,
        virtual_bytes: i64::try_from(field(23)?).ok()?,
        resident_bytes: i64::try_from(field(24)?.saturating_mul(page)).ok()?,
        start_time_seconds: boot_time.map(|boot| boot + start),
        open_fds: 0,
        max_fds: None,
    })
}

/// The soft limit on open files from `/proc/self/limits`.
fn parse_max_fds(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(s) = Sample::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                Some(s.resident_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                Some(s.virtual_bytes),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                Some(s.open_fds),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 \
                    123456789 2048 18446744073709551615";
        let s = parse_stat(stat, 100, 4096, Some(1_700_000_000)).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.resident_bytes, 2048 * 4096);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.start_time_seconds, Some(1_700_000_010));
    }

    #[test]
    fn max_fds_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }

    #[test]
    fn this_process_is_read() {
        let s = Sample::read().unwrap();
        assert!(s.resident_bytes > 0 && s.open_fds > 0, "{s:?}");
    }
}
