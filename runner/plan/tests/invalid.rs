//! Malformed and invalid experiment files: each gets one clear error, pinned here word for word,
//! and none panics. The cases are in `invalid_cases.json` beside this file: [name, text]; the
//! messages in the insta snapshot `snapshots/invalid_files.snap` (`cargo insta review`, or
//! `INSTA_UPDATE=always`, accepts an intended change).

use std::path::Path;
use xlab_proto::plugins::Registry;

fn error_of(name: &str, text: &str) -> String {
    let r = std::panic::catch_unwind(|| {
        xlab_plan::load_str(Path::new(&format!("{name}.yaml")), text, &mut Registry::default())
    });
    match r {
        Ok(Ok(_)) => panic!("{name}: accepted"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("{name}: panicked"),
    }
}

#[test]
fn every_invalid_file_gets_its_pinned_message() {
    let cases: Vec<(String, String)> = serde_json::from_str(include_str!("invalid_cases.json")).unwrap();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let got: String = cases.iter().map(|(n, t)| format!("## {n}\n{}\n\n", error_of(n, t))).collect();
    insta::with_settings!({prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!("invalid_files", got);
    });
}

/// Random bytes and random cuts of valid files never panic the parser.
#[test]
fn garbage_never_panics() {
    let valid = include_str!("../../../experiments/components.yaml");
    let mut s = 0x243F6A8885A308D3u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..300 {
        let cut = (next() as usize) % valid.len();
        let mut text: Vec<u8> = valid.as_bytes()[..cut].to_vec();
        for _ in 0..(next() % 4) {
            let i = (next() as usize) % (text.len() + 1);
            text.insert(i, b"{}[]:-&*!|>'\"\t\n #"[(next() % 17) as usize]);
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let r =
            std::panic::catch_unwind(|| xlab_plan::load_str(Path::new("fuzz.yaml"), &text, &mut Registry::default()));
        assert!(r.is_ok(), "panicked on:\n{text}");
    }
}
