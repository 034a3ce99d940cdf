pub struct Wheel;
