//! The JSON Schema of experiment files, generated from the types that read them, for editors
//! (YAML language servers complete and check against it). `experiments/schema.json` holds it;
//! a test fails when the two drift apart (`XLAB_BLESS=1` rewrites the file).

use crate::config::JobConfig;
use serde_json::{json, Value};

/// The schema of an experiment file.
pub fn schema() -> Value {
    let root = schemars::schema_for!(JobConfig);
    let job = serde_json::to_value(&root.schema).expect("schemas serialize");
    let definitions = serde_json::to_value(&root.definitions).expect("schemas serialize");
    // Defaults and stages hold partial configs: the same keys, none required.
    let config_props = job["properties"].clone();
    let partial = json!({"type": "object", "properties": config_props, "additionalProperties": false});
    let mut stage_props = config_props.as_object().cloned().unwrap_or_default();
    let dotted = json!({"type": "object", "additionalProperties": {"type": "array", "minItems": 1},
        "description": "dotted config keys to lists of values, e.g. `optimizer.lr: [0.01, 0.1]`"});
    for (k, v) in [
        ("grid", json!({"description": "cartesian product over dotted config keys", "allOf": [dotted.clone()]})),
        ("zip", json!({"description": "lists walked together", "allOf": [dotted]})),
        (
            "random",
            json!({"type": "object", "description": "`samples: N`, `seed`, and dotted keys drawn from \
                `uniform(a, b)`, `loguniform(a, b)`, `int(a, b)` or `choice([...])`; under a TPE search, \
                no `samples` (its `trials` is how many points it tries)",
                "properties": {"samples": {"type": "integer", "minimum": 1}, "seed": {"type": "integer", "minimum": 0}},
                "additionalProperties": {"type": "string"}}),
        ),
        (
            "variants",
            json!({"type": "array", "items": {"type": "object"}, "description": "partial configs, each with its own `grid` and an optional `name` (tables and legends show `variant=NAME`)"}),
        ),
        (
            "seeds",
            json!({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "array", "items": {"type": "integer", "minimum": 0}}]}),
        ),
        (
            "checkpoint",
            json!({"type": "object", "properties": {"every_epochs": {"type": "integer", "minimum": 1},
                "every_minutes": {"type": "number", "exclusiveMinimum": 0},
                "every_steps": {"type": "integer", "minimum": 1},
                "keep_weights": {"type": "array", "items": {"type": "integer", "minimum": 1}}},
                "minProperties": 1, "additionalProperties": false}),
        ),
        (
            "resources",
            json!({"type": "object", "additionalProperties": false, "properties": {
                "slots": {"type": "integer", "minimum": 1}, "device": {"enum": ["any", "cpu", "cuda"]},
                "memory_gb": {"type": "number", "exclusiveMinimum": 0}, "gpus": {"type": "integer", "minimum": 1}}}),
        ),
        (
            "needs",
            json!({"anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": false, "required": ["stage"],
                "properties": {"stage": {"type": "string"}, "select": {"enum": ["each", "all", "best"]},
                    "metric": {"type": "string"}, "mode": {"enum": ["max", "min"]},
                    "k": {"type": "integer", "minimum": 1}, "per": {"type": "array", "items": {"type": "string"}}}}]}),
        ),
        ("retries", json!({"type": "integer", "minimum": 0})),
        (
            "timeout",
            json!({"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": "^[0-9.]+ *(s|m|min|h)?$"}]}),
        ),
        (
            "step_timeout",
            json!({"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": "^[0-9.]+ *(s|m|min|h)?$"}]}),
        ),
        ("fail_fast", json!({"type": "boolean"})),
        ("priority", json!({"type": "integer"})),
        ("max_parallel", json!({"type": "integer", "minimum": 1})),
        (
            "search",
            json!({"type": "object", "additionalProperties": false, "required": ["algorithm", "metric"], "properties": {
                "algorithm": {"enum": ["asha", "hyperband", "tpe"]},
                "metric": {"type": "string", "pattern": "^(val|train|test)\\."},
                "mode": {"enum": ["max", "min"]},
                "min_epochs": {"type": "integer", "minimum": 1},
                "reduction": {"type": "integer", "minimum": 2},
                "trials": {"type": "integer", "minimum": 1},
                "startup": {"type": "integer", "minimum": 1},
                "seed": {"type": "integer", "minimum": 0},
                "stopping": {"enum": ["asha"]}}}),
        ),
        ("order", json!({"enum": ["plan", "shuffled", "interleave"]})),
    ] {
        stage_props.insert(k.to_string(), v);
    }
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "xlab experiment file",
        "type": "object",
        "required": ["name", "stages"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "description": {"type": "string"},
            "include": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "plugins": {"type": "array", "items": {"type": "string"}},
            "max_parallel": {"type": "integer", "minimum": 1},
            "executor": {"anyOf": [{"const": "local"}, {"type": "object", "additionalProperties": false, "required": ["slurm"],
                "properties": {"slurm": {"type": "object", "additionalProperties": false, "properties": {
                    "partition": {"type": "string"}, "account": {"type": "string"},
                    "time": {"type": ["string", "integer"]}, "mem": {"type": "string"},
                    "gpus_per_job": {"type": "integer", "minimum": 0},
                    "cpus_per_job": {"type": "integer", "minimum": 1},
                    "extra_args": {"type": "array", "items": {"type": "string"}},
                    "array_parallelism": {"type": "integer", "minimum": 1},
                    "max_submit": {"type": "integer", "minimum": 1},
                    "pack": {"type": "integer", "minimum": 1},
                    "pack_at_once": {"type": "integer", "minimum": 1},
                    "coordinator_time": {"type": ["string", "integer"]},
                    "poll_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 600}}}}}]},
            "defaults": partial,
            "stages": {"type": "object", "minProperties": 1,
                "additionalProperties": {"type": "object", "properties": stage_props, "additionalProperties": false}}
        },
        "definitions": definitions
    })
}
