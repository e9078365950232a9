//! Compiles only when implicit-etf and a `dynamic-linking` cudarc can share one build.
fn main() {
    let dev = implicit_etf::runtime::Device::from_env();
    println!("{:?}", dev.map(|d| d.name()));
}
