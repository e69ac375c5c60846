//! Compiles the small C++ shim that turns on libtorch's autocast for a device type and dtype
//! (`cpp/autocast.cpp`), against the same libtorch tch links (`LIBTORCH`, set for cargo by
//! `.cargo/config.toml`).

fn main() {
    println!("cargo:rerun-if-changed=cpp/autocast.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch =
        std::path::PathBuf::from(std::env::var("LIBTORCH").expect("LIBTORCH names libtorch (run `make setup`)"));
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .file("cpp/autocast.cpp")
        .compile("xlab_autocast");
}
