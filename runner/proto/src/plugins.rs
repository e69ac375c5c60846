//! Plugin descriptions as the coordinator sees them: what `xlab-worker plugins` reports, and the
//! checking of a component's parameters against its declared schema. No libtorch here: the
//! coordinator never loads a plugin library itself.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The type of a component parameter.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    Float,
    Int,
    Bool,
    String,
}

/// One declared parameter of a component.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ParamType,
    pub default: Value,
    pub doc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// For strings: the allowed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// Added to a component after its first release: at its default it stays out of the
    /// resolved config (the component fills it in), so the jobs that existed before it keep
    /// their identities.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added_later: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ComponentInfo {
    /// `step_rule`, `batch_transform`, `objective` or `sampler`.
    pub kind: String,
    pub id: String,
    pub summary: String,
    pub reference: String,
    pub params: Vec<ParamSpec>,
    pub passes_per_step: u32,
    pub stateful: bool,
    pub random: bool,
    /// A batch transform of diffusion training: it rewrites the drawn noise, not a labelled batch.
    #[serde(default)]
    pub noise: bool,
    /// A sampler that maps data to noise (`task: invert`), not noise to data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inverts: bool,
    /// A sampler that combines the conditional and unconditional predictions itself: it needs
    /// a class-conditional model trained with label dropout, and takes no `guidance:`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guides: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginInfo {
    pub id: String,
    pub version: String,
    pub file: String,
    pub sha256: String,
    pub components: Vec<ComponentInfo>,
}

/// A library that was found but refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Refusal {
    pub file: String,
    pub reason: String,
}

/// Every plugin a worker can load, as printed by `xlab-worker plugins`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Registry {
    pub plugins: Vec<PluginInfo>,
    pub refused: Vec<Refusal>,
}

impl Registry {
    /// The plugin and component with this id.
    pub fn component(&self, id: &str) -> Option<(&PluginInfo, &ComponentInfo)> {
        self.plugins.iter().find_map(|p| p.components.iter().find(|c| c.id == id).map(|c| (p, c)))
    }

    pub fn component_ids(&self) -> impl Iterator<Item = &str> {
        self.plugins.iter().flat_map(|p| p.components.iter().map(|c| c.id.as_str()))
    }
}

/// Checks user-given parameters against a component's schema and fills in defaults. Errors name
/// the parameter; unknown names come back as `Err((name, None))` so the caller can suggest.
pub fn resolve_params(component: &ComponentInfo, given: &Map<String, Value>) -> Result<Map<String, Value>, ParamError> {
    let mut out = Map::new();
    for (name, v) in given {
        let Some(spec) = component.params.iter().find(|p| &p.name == name) else {
            return Err(ParamError::Unknown { name: name.clone() });
        };
        out.insert(name.clone(), check_value(spec, v)?);
    }
    for spec in &component.params {
        if spec.added_later {
            // Given or not, the default is left out: one config, one identity.
            if out.get(&spec.name).is_some_and(|v| same_value(v, &spec.default)) {
                out.remove(&spec.name);
            }
        } else {
            out.entry(spec.name.clone()).or_insert_with(|| spec.default.clone());
        }
    }
    Ok(out)
}

/// Equal as parameter values: numbers by value (`1` and `1.0` are one number).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ParamError {
    Unknown { name: String },
    Invalid { name: String, message: String },
}

fn check_value(spec: &ParamSpec, v: &Value) -> Result<Value, ParamError> {
    let bad = |message: String| ParamError::Invalid { name: spec.name.clone(), message };
    let out = match spec.ty {
        ParamType::Float => {
            let f = v.as_f64().ok_or_else(|| bad(format!("expected a number, got {v}")))?;
            if !f.is_finite() {
                return Err(bad(format!("must be finite, got {f}")));
            }
            Value::from(f)
        }
        ParamType::Int => {
            let i = v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
                .ok_or_else(|| bad(format!("expected an integer, got {v}")))?;
            Value::from(i)
        }
        ParamType::Bool => Value::from(v.as_bool().ok_or_else(|| bad(format!("expected true or false, got {v}")))?),
        ParamType::String => {
            let s = v.as_str().ok_or_else(|| bad(format!("expected a string, got {v}")))?;
            if !spec.choices.is_empty() && !spec.choices.iter().any(|c| c == s) {
                return Err(bad(format!("`{s}` is not one of: {}", spec.choices.join(", "))));
            }
            Value::from(s)
        }
    };
    if let Some(x) = out.as_f64() {
        if let Some(min) = spec.min.filter(|m| x < *m) {
            return Err(bad(format!("must be ≥ {min}, got {x}")));
        }
        if let Some(max) = spec.max.filter(|m| x > *m) {
            return Err(bad(format!("must be ≤ {max}, got {x}")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sam() -> ComponentInfo {
        ComponentInfo {
            kind: "step_rule".into(),
            id: "sam.sam".into(),
            summary: String::new(),
            reference: String::new(),
            params: vec![
                ParamSpec {
                    name: "rho".into(),
                    ty: ParamType::Float,
                    default: json!(0.05),
                    doc: String::new(),
                    min: Some(0.0),
                    max: None,
                    choices: vec![],
                    added_later: false,
                },
                ParamSpec {
                    name: "m".into(),
                    ty: ParamType::Int,
                    default: json!(0),
                    doc: String::new(),
                    min: Some(0.0),
                    max: None,
                    choices: vec![],
                    added_later: false,
                },
            ],
            passes_per_step: 2,
            stateful: false,
            random: false,
            noise: false,
            inverts: false,
            guides: false,
        }
    }

    #[test]
    fn defaults_fill_in_and_numbers_are_checked() {
        let given = json!({"rho": 0.1}).as_object().unwrap().clone();
        let r = resolve_params(&sam(), &given).unwrap();
        assert_eq!(Value::Object(r), json!({"rho": 0.1, "m": 0}));
        let given = json!({"m": 4.0}).as_object().unwrap().clone();
        assert_eq!(resolve_params(&sam(), &given).unwrap()["m"], json!(4));
    }

    /// A parameter added after release stays out of the config at its default, given or not,
    /// so the config (and the job's identity) is what it was before the parameter existed.
    #[test]
    fn a_parameter_added_later_is_left_out_at_its_default() {
        let mut c = sam();
        c.params.push(ParamSpec {
            name: "karras".into(),
            ty: ParamType::Bool,
            default: json!(false),
            doc: String::new(),
            min: None,
            max: None,
            choices: vec![],
            added_later: true,
        });
        let before = resolve_params(&sam(), &Map::new()).unwrap();
        assert_eq!(resolve_params(&c, &Map::new()).unwrap(), before);
        let given = json!({"karras": false}).as_object().unwrap().clone();
        assert_eq!(resolve_params(&c, &given).unwrap(), before);
        let given = json!({"karras": true}).as_object().unwrap().clone();
        assert_eq!(resolve_params(&c, &given).unwrap()["karras"], json!(true));
        let given = json!({"karras": 3}).as_object().unwrap().clone();
        assert!(matches!(resolve_params(&c, &given), Err(ParamError::Invalid { .. })));
    }

    #[test]
    fn unknown_and_invalid_parameters_are_named() {
        let given = json!({"rh0": 0.1}).as_object().unwrap().clone();
        assert_eq!(resolve_params(&sam(), &given), Err(ParamError::Unknown { name: "rh0".into() }));
        let given = json!({"rho": -1}).as_object().unwrap().clone();
        assert!(
            matches!(resolve_params(&sam(), &given), Err(ParamError::Invalid { name, message }) if name == "rho" && message.contains("≥ 0"))
        );
        let given = json!({"m": 1.5}).as_object().unwrap().clone();
        assert!(matches!(resolve_params(&sam(), &given), Err(ParamError::Invalid { .. })));
    }
}

/// A plugin library a job uses: recorded with the job for provenance and handed to its worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PluginUse {
    pub id: String,
    pub version: String,
    pub file: String,
    pub sha256: String,
}

/// One job as `xlab-worker check` examines it before anything runs: its data is read, its model
/// built and its components constructed with their parameters (and, for a training job of its
/// own, set up with the data), so a mistake only running code can find is reported at
/// validation, once, instead of failing every job of the sweep.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobCheck {
    /// The job's resolved config (`JobConfig` as JSON).
    pub config: serde_json::Value,
    pub seed: u64,
    /// Whether the job consumes other jobs (`needs:`); such a job's components are constructed
    /// but not set up, since the parents have not run.
    pub has_parents: bool,
    pub plugins: Vec<PluginUse>,
}

/// What `xlab-worker check` found wrong with one job of the list it was given.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckFailure {
    /// Its position in the list.
    pub index: usize,
    /// The config key at fault: `data`, `model`, or a component slot (`step_rule`, …).
    pub key: String,
    pub message: String,
}
