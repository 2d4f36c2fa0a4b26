//! The generated protobuf types and gRPC stubs of `credbroker.v1` (the
//! `credbroker-proto` crate).

pub use credbroker_proto::pb::*;
