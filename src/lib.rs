pub mod wheel;
#[cfg(feature = "cli")]
pub mod units;
#[cfg(feature = "cli")]
pub mod load;
