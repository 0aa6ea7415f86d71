/// mimalloc: the processor allocates many small, short-lived buffers per
/// push (records, headers, markers), which glibc's malloc serves slowly
/// (BENCHMARKS.md has the profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    keyflight::cli::main()
}

/// Transparent huge pages off for this process. mimalloc hands pages back
/// and takes fresh ones all the time, and with THP each fresh fault zeroes
/// 2 MiB.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments only; it cannot fail in a way
    // that matters (without it, THP stays as the system set it).
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
