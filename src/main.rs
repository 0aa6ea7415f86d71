fn main() -> std::process::ExitCode {
    keyflight::cli::main()
}
