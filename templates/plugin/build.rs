//! Puts libtorch's folder into the rpath of everything this package links (the plugin library
//! and its test binaries), so `cargo test` finds libtorch without `LD_LIBRARY_PATH` when the
//! plugin is built outside an xlab checkout with `LIBTORCH=<xlab>/.venv/torch`. Inside a
//! checkout, xlab's own `.cargo/config.toml` does this.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
