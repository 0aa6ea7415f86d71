/// mimalloc: the processor allocates many small, short-lived buffers per
/// push (records, headers, markers); glibc's malloc spent a quarter of the
/// CPU on them in the benchmark's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    keyflight::cli::main()
}

/// Transparent huge pages off for this process. mimalloc hands pages back
/// and takes fresh ones all the time, and with THP each fresh fault zeroed
/// 2 MiB: 10–17 % of keyflight's CPU in the benchmark's profile (0.5 %
/// without THP; CPU per event 4.8 → 4.3 µs over three runs each).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments only; it cannot fail in a way
    // that matters (without it, THP stays as the system set it).
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
