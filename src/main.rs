/// mimalloc: the processor allocates many small, short-lived buffers per
/// push (records, headers, markers); glibc's malloc spent a quarter of the
/// CPU on them in the benchmark's profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keyflight::cli::main()
}
