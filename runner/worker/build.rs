//! Compiles the small C++ shims over the parts of libtorch the tch crate does not expose, against
//! the same libtorch tch links (`LIBTORCH`, set for cargo by `.cargo/config.toml`): autocast for a
//! device type and dtype (`cpp/autocast.cpp`), and dropping gradients and the fused optimizer
//! kernels (`cpp/optim.cpp`).

fn main() {
    println!("cargo:rerun-if-changed=cpp/autocast.cpp");
    println!("cargo:rerun-if-changed=cpp/optim.cpp");
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
        .file("cpp/optim.cpp")
        .compile("xlab_torch_shim");
}
