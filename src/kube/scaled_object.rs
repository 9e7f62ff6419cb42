//! A KEDA ScaledObject read from its YAML into the model's settings: KEDA's part ([`Keda`]) and
//! the HPA it creates ([`HpaSpec`]). Omitted fields take KEDA's and Kubernetes' defaults, so a
//! ScaledObject without `behavior` gets the controller's own rules, not a `behavior`'s.

use serde::Deserialize;

use super::Millis;
use super::hpa::{
    Behavior, ClusterTolerance, DEFAULT_DOWNSCALE_WINDOW, HpaSpec, RatePolicy, ScalingRules, Select,
};
use super::keda::{Fallback, FallbackBehavior, Keda};

/// The shipped `keda/scaledobject.yaml`, built in.
pub const SHIPPED_YAML: &str = include_str!("../../keda/scaledobject.yaml");

/// A ScaledObject's settings as the model plays them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledObject {
    /// Polling, cooldown, push activation, replica bounds and fallback.
    pub keda: Keda,
    /// `advanced.horizontalPodAutoscalerConfig.behavior`; `None` when not set.
    pub behavior: Option<Behavior>,
}

/// Why a ScaledObject could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScaledObjectError {
    /// Not YAML of the expected shape.
    #[error("not a ScaledObject: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// A field the model cannot play.
    #[error("{field}: {reason}")]
    Field {
        /// The field's path.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ScaledObject {
    /// The shipped `keda/scaledobject.yaml`.
    pub fn shipped() -> Self {
        ScaledObject::from_yaml(SHIPPED_YAML)
            .expect("keda/scaledobject.yaml is a valid ScaledObject")
    }

    /// KEDA's defaults for a ScaledObject with only a pull trigger (poll 30 s, cooldown
    /// 300 s, 0 to 100 replicas, no fallback, no `behavior`): how KEDA's built-in scalers run
    /// unless their documented examples set more.
    pub fn keda_defaults() -> Self {
        ScaledObject {
            keda: Keda {
                polling: 30_000,
                cooldown: 300_000,
                push: false,
                min_replicas: 0,
                max_replicas: 100,
                fallback: None,
            },
            behavior: None,
        }
    }

    /// Reads the first document of `text`, a ScaledObject.
    pub fn from_yaml(text: &str) -> Result<Self, ScaledObjectError> {
        let document: Document = serde_yaml_ng::from_str(text)?;
        if document.kind != "ScaledObject" {
            return Err(field(
                "kind",
                format!("{:?} is not ScaledObject", document.kind),
            ));
        }
        let spec = document.spec;
        let defaults = ScaledObject::keda_defaults().keda;
        let fallback = spec.fallback.map(|f| f.read()).transpose()?;
        let keda = Keda {
            polling: seconds(spec.polling_interval, defaults.polling),
            cooldown: seconds(spec.cooldown_period, defaults.cooldown),
            push: spec
                .triggers
                .iter()
                .any(|trigger| trigger.kind == "external-push"),
            min_replicas: spec.min_replica_count.unwrap_or(defaults.min_replicas),
            max_replicas: spec.max_replica_count.unwrap_or(defaults.max_replicas),
            fallback,
        };
        if keda.max_replicas == 0 || keda.max_replicas < keda.min_replicas {
            return Err(field(
                "spec.maxReplicaCount",
                format!("{} is below minReplicaCount or 0", keda.max_replicas),
            ));
        }
        let behavior = spec
            .advanced
            .and_then(|advanced| advanced.horizontal_pod_autoscaler_config)
            .and_then(|config| config.behavior)
            .map(|behavior| -> Result<Behavior, ScaledObjectError> {
                Ok(Behavior {
                    scale_up: match behavior.scale_up {
                        Some(rules) => rules.read(ScalingRules::default_scale_up())?,
                        None => ScalingRules::default_scale_up(),
                    },
                    scale_down: match behavior.scale_down {
                        Some(rules) => rules.read(ScalingRules::default_scale_down())?,
                        None => ScalingRules::default_scale_down(),
                    },
                })
            })
            .transpose()?;
        Ok(ScaledObject { keda, behavior })
    }

    /// The HPA KEDA creates for it, on a cluster with `tolerance`.
    pub fn hpa_spec(&self, tolerance: ClusterTolerance) -> HpaSpec {
        HpaSpec {
            min_replicas: self.keda.hpa_min_replicas(),
            max_replicas: self.keda.max_replicas,
            behavior: self.behavior.clone(),
            tolerance,
            downscale_window: DEFAULT_DOWNSCALE_WINDOW,
        }
    }

    /// How long an unneeded pod is kept: the scale-down window (the controller's without a
    /// `behavior`).
    pub fn scale_down_window(&self) -> Millis {
        self.behavior
            .as_ref()
            .map_or(DEFAULT_DOWNSCALE_WINDOW, |behavior| {
                behavior.scale_down.stabilization
            })
    }
}

fn field(field: &'static str, reason: String) -> ScaledObjectError {
    ScaledObjectError::Field { field, reason }
}

fn seconds(value: Option<u64>, default: Millis) -> Millis {
    value.map_or(default, |seconds| seconds.saturating_mul(1000))
}

#[derive(Deserialize)]
struct Document {
    kind: String,
    spec: Spec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    polling_interval: Option<u64>,
    cooldown_period: Option<u64>,
    min_replica_count: Option<u32>,
    max_replica_count: Option<u32>,
    fallback: Option<FallbackYaml>,
    advanced: Option<Advanced>,
    #[serde(default)]
    triggers: Vec<Trigger>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FallbackYaml {
    failure_threshold: u32,
    replicas: u32,
    behavior: Option<String>,
}

impl FallbackYaml {
    fn read(self) -> Result<Fallback, ScaledObjectError> {
        let behavior = match self.behavior.as_deref().unwrap_or("static") {
            "static" => FallbackBehavior::Static,
            "currentReplicas" => FallbackBehavior::CurrentReplicas,
            "currentReplicasIfHigher" => FallbackBehavior::CurrentReplicasIfHigher,
            "currentReplicasIfLower" => FallbackBehavior::CurrentReplicasIfLower,
            other => {
                return Err(field(
                    "spec.fallback.behavior",
                    format!("unknown {other:?}"),
                ));
            }
        };
        Ok(Fallback {
            failure_threshold: self.failure_threshold,
            replicas: self.replicas,
            behavior,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Advanced {
    horizontal_pod_autoscaler_config: Option<HpaConfig>,
}

#[derive(Deserialize)]
struct HpaConfig {
    behavior: Option<BehaviorYaml>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BehaviorYaml {
    scale_up: Option<RulesYaml>,
    scale_down: Option<RulesYaml>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RulesYaml {
    stabilization_window_seconds: Option<u64>,
    tolerance: Option<f64>,
    select_policy: Option<String>,
    policies: Option<Vec<PolicyYaml>>,
}

impl RulesYaml {
    /// Omitted fields take `defaults`' (`GenerateHPAScaleUpRules`/`...ScaleDownRules`).
    fn read(self, defaults: ScalingRules) -> Result<ScalingRules, ScaledObjectError> {
        let select = match self.select_policy.as_deref() {
            None => defaults.select,
            Some("Max") => Select::Max,
            Some("Min") => Select::Min,
            Some("Disabled") => Select::Disabled,
            Some(other) => {
                return Err(field("behavior.selectPolicy", format!("unknown {other:?}")));
            }
        };
        if let Some(tolerance) = self.tolerance
            && !(0.0..1.0).contains(&tolerance)
        {
            return Err(field(
                "behavior.tolerance",
                format!("{tolerance} is not in [0, 1)"),
            ));
        }
        let policies = match self.policies {
            None => defaults.policies,
            Some(policies) => policies
                .into_iter()
                .map(|policy| {
                    let period = policy.period_seconds.saturating_mul(1000);
                    match policy.kind.as_str() {
                        "Pods" => Ok(RatePolicy::Pods {
                            value: policy.value,
                            period,
                        }),
                        "Percent" => Ok(RatePolicy::Percent {
                            value: policy.value,
                            period,
                        }),
                        other => Err(field(
                            "behavior.policies.type",
                            format!("unknown {other:?}"),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(ScalingRules {
            stabilization: seconds(self.stabilization_window_seconds, defaults.stabilization),
            tolerance: self.tolerance,
            select,
            policies,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyYaml {
    #[serde(rename = "type")]
    kind: String,
    value: u32,
    period_seconds: u64,
}

#[derive(Deserialize)]
struct Trigger {
    #[serde(rename = "type")]
    kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scaled_object_reads_as_written() {
        let shipped = ScaledObject::shipped();
        assert_eq!(
            shipped.keda,
            Keda {
                polling: 15_000,
                cooldown: 120_000,
                push: true,
                min_replicas: 0,
                max_replicas: 40,
                fallback: Some(Fallback {
                    failure_threshold: 3,
                    replicas: 1,
                    behavior: FallbackBehavior::CurrentReplicasIfHigher,
                }),
            }
        );
        let behavior = shipped.behavior.expect("the shipped file sets a behavior");
        assert_eq!(
            behavior.scale_up,
            ScalingRules {
                stabilization: 0,
                tolerance: Some(0.0),
                select: Select::Max,
                policies: vec![RatePolicy::Pods {
                    value: 100,
                    period: 15_000
                }],
            }
        );
        assert_eq!(
            behavior.scale_down,
            ScalingRules {
                stabilization: 120_000,
                tolerance: None,
                select: Select::Max,
                policies: vec![RatePolicy::Percent {
                    value: 100,
                    period: 15_000
                }],
            }
        );
    }

    #[test]
    fn omitted_fields_take_the_defaults() {
        let text = "kind: ScaledObject\nspec:\n  triggers:\n    - type: redis\n";
        assert_eq!(
            ScaledObject::from_yaml(text).unwrap(),
            ScaledObject::keda_defaults()
        );
        let text = "kind: ScaledObject\nspec:\n  advanced:\n    horizontalPodAutoscalerConfig:\n      behavior:\n        scaleDown:\n          selectPolicy: Min\n";
        let read = ScaledObject::from_yaml(text).unwrap();
        let behavior = read.behavior.unwrap();
        assert_eq!(behavior.scale_up, ScalingRules::default_scale_up());
        assert_eq!(behavior.scale_down.stabilization, DEFAULT_DOWNSCALE_WINDOW);
        assert_eq!(behavior.scale_down.select, Select::Min);
    }

    #[test]
    fn bad_fields_are_named() {
        let text = "kind: ScaledObject\nspec:\n  fallback:\n    failureThreshold: 3\n    replicas: 1\n    behavior: sometimes\n";
        let error = ScaledObject::from_yaml(text).unwrap_err().to_string();
        assert!(error.contains("spec.fallback.behavior"), "{error}");
        let error = ScaledObject::from_yaml("kind: Deployment\nspec: {}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("kind"), "{error}");
    }
}
