//! The layers (built-in defaults < TOML file < `KEYFLIGHT_*` environment <
//! flags) merged into [`Settings`], and the errors that name where a bad
//! value came from.

use super::validate::validate;
use super::*;

/// Values given on the command line; `None` leaves the lower layers in force.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the span fields (topic, partition).
    Json,
}

/// The command-line layer, named so errors can point at it.
struct Flags<'a>(&'a Overrides);

impl Provider for Flags<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag")
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(self.0).data()
    }
}

/// A configuration problem: where it came from, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, environment variable or flag that set the value.
    pub source: String,
    /// Dotted key, e.g. `compensation.interval`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "invalid configuration: {}: key `{}`: {}",
                p.source, p.key, p.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn single(
        source: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            problems: vec![Problem {
                source: source.into(),
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

/// Loads the layered configuration and validates it.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Settings::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::single(
                path.display().to_string(),
                "--config",
                "no such file (give the path of a TOML file, see config/keyflight.toml)",
            ));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment
        .merge(Env::prefixed(ENV_PREFIX).ignore(ENV_NOT_KEYS).split("__"))
        .merge(Flags(overrides));
    let mut settings: Settings = figment.extract().map_err(from_figment)?;
    let interval_is_default = figment
        .find_metadata("commit_interval")
        .is_none_or(|m| m.name == std::any::type_name::<Settings>());
    if settings.processing_guarantee == ProcessingGuarantee::ExactlyOnce && interval_is_default {
        settings.commit_interval = EXACTLY_ONCE_COMMIT_INTERVAL;
    }
    validate(&settings, &figment)?;
    Ok(settings)
}

fn from_figment(error: figment::Error) -> ConfigError {
    let problems = error
        .into_iter()
        .map(|e| {
            let message = match &e.kind {
                // Figment's path already ends with the unknown field's name.
                figment::error::Kind::UnknownField(_, expected) => {
                    format!("unknown key; expected one of: {}", expected.join(", "))
                }
                figment::error::Kind::UnknownVariant(found, expected) => {
                    format!(
                        "unknown value `{found}`; expected one of: {}",
                        expected.join(", ")
                    )
                }
                other => other.to_string(),
            };
            let key = e.path.join(".");
            Problem {
                source: describe_source(e.metadata.as_ref(), &key),
                key,
                message,
            }
        })
        .collect();
    ConfigError { problems }
}

pub(super) fn describe_source(metadata: Option<&Metadata>, key: &str) -> String {
    match metadata {
        Some(Metadata {
            source: Some(Source::File(path)),
            ..
        }) => path.display().to_string(),
        Some(m) if m.name.contains("environment") => {
            format!(
                "environment variable {ENV_PREFIX}{}",
                key.replace('.', "__").to_ascii_uppercase()
            )
        }
        Some(m) if m.name == "command-line flag" => format!("flag --{}", key.replace('_', "-")),
        Some(m) => m.name.to_string(),
        None => "built-in defaults".into(),
    }
}
