//! Compiles proto/ with protox (pure Rust), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../../proto";
    let files = [
        "consul_smi/v1/smi.proto",
        "consul_smi/v1/trace.proto",
        "consul_smi/v1/watch.proto",
        "consul_smi/v1/writer.proto",
        "consul_smi/v1/translator.proto",
    ];
    println!("cargo:rerun-if-changed={proto_root}");
    let descriptors = protox::compile(files, [proto_root])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
