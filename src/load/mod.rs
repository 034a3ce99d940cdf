//! TEMPORARY stub: the load generator is being written.
#![allow(missing_docs)]
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub json: bool,
}
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub progress: bool,
}
impl LoadArgs {
    pub fn to_config(&self) -> Result<LoadConfig, String> {
        Err("not yet".into())
    }
}
#[derive(Debug)]
pub struct Report;
impl Report {
    pub fn to_json(&self) -> String {
        String::new()
    }
}
impl std::fmt::Display for Report {
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}
pub fn run(_c: &LoadConfig) -> Result<Report, String> {
    Err("not yet".into())
}
