//! `keyflight config show`.

use clap::{Args, Subcommand};

use super::CliError;
use crate::config::Settings;

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration as TOML, secrets redacted
    ///
    /// Loading validates: a bad key or value exits with status 2 and names
    /// the file or variable, the key and the problem.
    #[command(
        after_help = "Example:\n  keyflight --config config/keyflight.toml --brokers b1:9092 config show"
    )]
    Show,
}

pub fn run(settings: &Settings, args: ConfigArgs) -> Result<(), CliError> {
    match args.command {
        ConfigCommand::Show => {
            let text = toml::to_string_pretty(&settings.redacted())
                .map_err(|e| CliError::Runtime(format!("cannot print the configuration: {e}")))?;
            print!("{text}");
            Ok(())
        }
    }
}
