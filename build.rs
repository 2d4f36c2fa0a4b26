//! Compiles `proto/` with protox (no system `protoc`) and writes the
//! descriptor set that server reflection serves. The build script of the
//! `credbroker-proto` crate (crates/proto), which the server and the client
//! share.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Run from crates/proto: the workspace's proto/ is two levels up.
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../..");
    let proto = root.join("proto");
    let files = [proto.join("credbroker/v1/credbroker.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(files, [proto])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("credbroker_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // The broker's codec: prost with a small first encode buffer (see
        // crates/proto/src/codec.rs).
        .codec_path("crate::codec::Codec")
        // Messages that carry secret bytes get a hand-written, redacted Debug.
        .skip_debug([
            "credbroker.v1.CredentialSet",
            "credbroker.v1.SetWebhookRequest",
            "credbroker.v1.SetWebhookResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
