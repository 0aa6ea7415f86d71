//! `keyflight topics create`: make the four topics exist with a layout that
//! works, idempotently. The decision ([`plan`]) is pure; [`create_topics`]
//! reads the cluster, applies the plan and reports per topic.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::{client_config, Role};
use crate::config::Settings;

/// Partitions of `events.in` when neither the flag nor an existing topic says.
pub const DEFAULT_PARTITIONS: i32 = 3;

/// What a topic is for, which decides the layout it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicRole {
    Input,
    Pushed,
    DeadLetter,
    Changelog,
}

/// What the cluster already has of a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    pub partitions: i32,
    /// `cleanup.policy`, when it was read (only needed for the changelog).
    pub cleanup_policy: Option<String>,
}

/// One topic's part of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPlan {
    pub name: String,
    pub role: TopicRole,
    pub partitions: i32,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Create,
    /// Exists with a compatible layout.
    Keep,
}

/// A layout that keyflight cannot work with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("topic `{topic}` exists with {existing} partitions, but --partitions asks for {wanted}; drop the flag to keep the existing layout, or use another topic name")]
    InputPartitions {
        topic: String,
        existing: i32,
        wanted: i32,
    },
    #[error("changelog topic `{topic}` has {existing} partitions but input topic `{input}` has {input_partitions}; the changelog needs one partition per input partition. Delete and recreate the changelog (its state is rebuilt from replay) or use another application id")]
    ChangelogPartitions {
        topic: String,
        existing: i32,
        input: String,
        input_partitions: i32,
    },
    #[error("changelog topic `{topic}` has cleanup.policy={policy}; it must be `compact` alone: `delete` lets retention remove markers a restore needs, so a restore would miss their keys (kafka-configs --alter --add-config cleanup.policy=compact)")]
    ChangelogNotCompacted { topic: String, policy: String },
}

/// Decides, from what exists, what to create. `wanted_partitions` is the
/// `--partitions` flag; without it an existing input topic sets the count.
pub fn plan(
    settings: &Settings,
    wanted_partitions: Option<i32>,
    existing: &BTreeMap<String, Existing>,
) -> Result<Vec<TopicPlan>, Vec<Mismatch>> {
    let input = &settings.topics.input;
    let mut mismatches = Vec::new();
    let input_partitions = match (existing.get(input), wanted_partitions) {
        (Some(found), Some(wanted)) if found.partitions != wanted => {
            mismatches.push(Mismatch::InputPartitions {
                topic: input.clone(),
                existing: found.partitions,
                wanted,
            });
            found.partitions
        }
        (Some(found), _) => found.partitions,
        (None, wanted) => wanted.unwrap_or(DEFAULT_PARTITIONS),
    };
    let changelog = settings.changelog_topic();
    // The HTTP sink without an audit topic writes no pushed topic.
    let pushed = settings
        .pushes_topic()
        .map(|t| (t.to_string(), TopicRole::Pushed));
    let topics = [
        Some((input.clone(), TopicRole::Input)),
        pushed,
        Some((settings.topics.dead_letter.clone(), TopicRole::DeadLetter)),
        Some((changelog, TopicRole::Changelog)),
    ]
    .into_iter()
    .flatten();
    let mut plans = Vec::new();
    for (name, role) in topics {
        let Some(found) = existing.get(&name) else {
            plans.push(TopicPlan {
                name,
                role,
                partitions: input_partitions,
                action: Action::Create,
            });
            continue;
        };
        if role == TopicRole::Changelog {
            if found.partitions != input_partitions {
                mismatches.push(Mismatch::ChangelogPartitions {
                    topic: name.clone(),
                    existing: found.partitions,
                    input: input.clone(),
                    input_partitions,
                });
            }
            if let Some(policy) = found.cleanup_policy.as_ref().filter(|p| !compact_only(p)) {
                mismatches.push(Mismatch::ChangelogNotCompacted {
                    topic: name.clone(),
                    policy: policy.clone(),
                });
            }
        }
        plans.push(TopicPlan {
            name,
            role,
            partitions: found.partitions,
            action: Action::Keep,
        });
    }
    if mismatches.is_empty() {
        Ok(plans)
    } else {
        Err(mismatches)
    }
}

/// Why `topics create` failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("cannot reach the Kafka cluster at {brokers}: {source}")]
    Unreachable {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("{}", .0.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("\n"))]
    Mismatch(Vec<Mismatch>),
    #[error("creating topic `{topic}` failed: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("admin request failed: {0}")]
    Admin(#[from] rdkafka::error::KafkaError),
}

/// The outcome per topic, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report(pub Vec<TopicPlan>);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for plan in &self.0 {
            let what = match plan.action {
                Action::Create => "created",
                Action::Keep => "exists ",
            };
            let note = if plan.role == TopicRole::Changelog {
                ", cleanup.policy=compact"
            } else {
                ""
            };
            writeln!(
                f,
                "{what}  {:<40} {} partitions{note}",
                plan.name, plan.partitions
            )?;
        }
        Ok(())
    }
}

/// Creates the missing topics; leaves compatible ones alone; refuses a
/// mismatch without creating anything.
pub async fn create_topics(
    settings: &Settings,
    partitions: Option<i32>,
    replication: i32,
    timeout: Duration,
) -> Result<Report, TopicsError> {
    let unreachable = |source| TopicsError::Unreachable {
        brokers: settings.brokers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> = client_config(settings, Role::Admin)
        .create()
        .map_err(unreachable)?;
    // All topics at once: asking for one by name could auto-create it.
    let metadata = tokio::task::block_in_place(|| admin.inner().fetch_metadata(None, timeout))
        .map_err(unreachable)?;
    let mut existing: BTreeMap<String, Existing> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| {
            (
                t.name().to_string(),
                Existing {
                    partitions: t.partitions().len() as i32,
                    cleanup_policy: None,
                },
            )
        })
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let changelog = settings.changelog_topic();
    if let Some(found) = existing.get_mut(&changelog) {
        found.cleanup_policy = topic_configs(&admin, &[&changelog], "cleanup.policy", &options)
            .await
            .pop()
            .flatten();
    }

    let plans = plan(settings, partitions, &existing).map_err(TopicsError::Mismatch)?;
    let to_create = plans
        .iter()
        .filter(|p| p.action == Action::Create)
        .map(|p| {
            let topic = NewTopic::new(&p.name, p.partitions, TopicReplication::Fixed(replication));
            if p.role == TopicRole::Changelog {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        });
    let new_topics: Vec<NewTopic> = to_create.collect();
    if !new_topics.is_empty() {
        for result in admin.create_topics(&new_topics, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(TopicsError::Create { topic, code }),
            }
        }
    }
    Ok(Report(plans))
}

/// Whether a `cleanup.policy` keeps every key's last record for good:
/// `compact` and nothing else (`compact,delete` also drops old segments).
fn compact_only(policy: &str) -> bool {
    policy.split(',').all(|p| p.trim() == "compact")
}

/// The value of the configuration entry `name` of each of `topics`, in
/// one DescribeConfigs request; `None` where the broker does not say (some
/// Kafka-compatible brokers do not implement DescribeConfigs).
pub(crate) async fn topic_configs(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[&str],
    name: &str,
    options: &AdminOptions,
) -> Vec<Option<String>> {
    let resources: Vec<ResourceSpecifier> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let Ok(results) = admin.describe_configs(&resources, options).await else {
        return vec![None; topics.len()];
    };
    let mut values: Vec<Option<String>> = results
        .into_iter()
        .map(|result| {
            let resource = result.ok()?;
            resource.entries.into_iter().find(|e| e.name == name)?.value
        })
        .collect();
    values.resize(topics.len(), None);
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(items: &[(&str, i32, Option<&str>)]) -> BTreeMap<String, Existing> {
        items
            .iter()
            .map(|(n, p, c)| {
                (
                    n.to_string(),
                    Existing {
                        partitions: *p,
                        cleanup_policy: c.map(String::from),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn fresh_cluster_creates_all_four_with_the_same_partitions() {
        let plans = plan(&Settings::default(), Some(6), &BTreeMap::new()).unwrap();
        let names: Vec<_> = plans
            .iter()
            .map(|p| (p.name.as_str(), p.partitions, p.action.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("events.in", 6, Action::Create),
                ("events.pushed", 6, Action::Create),
                ("events.dlq", 6, Action::Create),
                ("keyflight-markers-changelog", 6, Action::Create),
            ]
        );
    }

    #[test]
    fn existing_input_sets_the_changelog_partitions() {
        let plans = plan(
            &Settings::default(),
            None,
            &existing(&[("events.in", 12, None)]),
        )
        .unwrap();
        assert!(plans.iter().all(|p| p.partitions == 12));
        assert_eq!(plans[0].action, Action::Keep);
    }

    #[test]
    fn mismatches_are_reported_not_fixed() {
        let err = plan(
            &Settings::default(),
            Some(3),
            &existing(&[
                ("events.in", 4, None),
                ("keyflight-markers-changelog", 2, Some("delete")),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.len(), 3, "{err:?}");
        assert!(err[1]
            .to_string()
            .contains("has 2 partitions but input topic `events.in` has 4"));
        assert!(err[2].to_string().contains("cleanup.policy=delete"));
    }

    #[test]
    fn a_changelog_that_also_deletes_is_refused() {
        for policy in ["compact,delete", "delete,compact", "delete"] {
            let err = plan(
                &Settings::default(),
                Some(2),
                &existing(&[("keyflight-markers-changelog", 2, Some(policy))]),
            )
            .unwrap_err();
            assert_eq!(err.len(), 1, "{policy}: {err:?}");
            assert!(
                err[0].to_string().contains("must be `compact` alone"),
                "{policy}: {}",
                err[0]
            );
        }
        let ok = plan(
            &Settings::default(),
            Some(2),
            &existing(&[("keyflight-markers-changelog", 2, Some("compact"))]),
        );
        assert!(ok.is_ok(), "{ok:?}");
    }
}
