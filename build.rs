//! Compiles `proto/` with protox (no system `protoc`) and writes the
//! descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/credbroker/v1/credbroker.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("credbroker_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Messages that carry secret bytes get a hand-written, redacted Debug.
        .skip_debug([
            "credbroker.v1.CredentialSet",
            "credbroker.v1.SetWebhookRequest",
            "credbroker.v1.SetWebhookResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
