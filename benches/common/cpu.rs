//! The process's CPU time, shared by the benchmarks that report it.

/// CPU seconds this process has used so far (user + system, all threads;
/// `/proc/self/stat` counts in USER_HZ = 100 ticks per second).
pub fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}
