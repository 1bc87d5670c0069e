#![no_std]
//! Present so the agent can name this crate as a build-dependency (aya-build builds its binary).
