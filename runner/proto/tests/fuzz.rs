//! The worker's event stream parser never panics on a line, whatever a worker (or a library
//! writing to its standard output) prints (`make fuzz` runs it for longer).

use xlab_proto::Event;

#[test]
fn fuzz_event_lines() {
    let dict: &[&[u8]] = &[
        b"{\"event\":",
        b"\"metrics\"",
        b"\"finished\"",
        b"\"failed\"",
        b"\"checkpoint\"",
        b"\"started\"",
        b"\"step\":",
        b"\"values\":{",
        b"\"summary\":{",
        b"\"NaN\"",
        b"\"inf\"",
        b"\"-inf\"",
        b"null",
        b"1e999",
        b"\"cause\":\"hung\"",
        b"\"message\":\"",
        b"}",
        b",",
        b"\\u0000",
        b"18446744073709551616",
    ];
    xlab_fuzz::check("events", dict, 50_000, |bytes| {
        let line = String::from_utf8_lossy(bytes);
        match Event::from_line(&line) {
            // What parses must encode again and parse to the same event.
            Ok(e) => match Event::from_line(&e.to_line()) {
                Ok(back) if format!("{back:?}") == format!("{e:?}") => Ok(()),
                Ok(back) => panic!("{e:?} came back as {back:?}"),
                Err(err) => panic!("{e:?} does not parse back: {err}"),
            },
            Err(e) => Err(e.to_string()),
        }
    });
}
