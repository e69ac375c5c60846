//! `experiments/schema.json` is the schema the code generates (this test fails when they drift;
//! `XLAB_BLESS=1` rewrites the file), and it names every key the parser accepts.

use std::path::Path;

fn schema_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/schema.json")
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let generated = serde_json::to_string_pretty(&xlab_plan::schema::schema()).unwrap() + "\n";
    if std::env::var_os("XLAB_BLESS").is_some() {
        std::fs::write(schema_file(), &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(schema_file()).unwrap_or_default();
    assert!(
        committed == generated,
        "experiments/schema.json is out of date with the code: run `XLAB_BLESS=1 cargo test -p xlab-plan --test schema`"
    );
}

#[test]
fn the_schema_covers_every_key_of_the_shipped_experiments() {
    let schema = xlab_plan::schema::schema();
    let top = schema["properties"].as_object().unwrap();
    let stage = schema["properties"]["stages"]["additionalProperties"]["properties"].as_object().unwrap();
    let defaults = schema["properties"]["defaults"]["properties"].as_object().unwrap();
    for k in xlab_plan::file::CONFIG_KEYS {
        assert!(defaults.contains_key(*k) && stage.contains_key(*k), "{k}");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
    let mut files = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        files += 1;
        let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        for (k, v) in doc.as_mapping().unwrap() {
            let k = k.as_str().unwrap();
            assert!(top.contains_key(k), "{}: `{k}`", p.display());
            if k == "stages" {
                for (name, body) in v.as_mapping().unwrap() {
                    for (sk, _) in body.as_mapping().unwrap() {
                        let sk = sk.as_str().unwrap();
                        assert!(stage.contains_key(sk), "{}: stages.{}.{sk}", p.display(), name.as_str().unwrap());
                    }
                }
            }
        }
    }
    assert!(files >= 5);
}
