//! Realistic, reproducible sensor signals: a daily temperature sine with
//! noise, humidity that follows it inversely, a mean-reverting pressure, a
//! slowly draining battery and the occasional spike.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DAY_MS: f64 = 86_400_000.0;

pub struct SignalGen {
    rng: StdRng,
    full_precision: bool,
    phase: f64,
    temperature: f64,
    pressure: f64,
    battery: f64,
}

impl SignalGen {
    /// Same seed and device index, same signals.
    /// `full_precision`: values as computed, not rounded to the sensor's
    /// resolution.
    pub fn new(seed: u64, device_index: u64, full_precision: bool) -> Self {
        let mut rng =
            StdRng::seed_from_u64(seed ^ device_index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let phase = rng.random::<f64>() * std::f64::consts::TAU * 0.1;
        let battery = 80.0 + rng.random::<f64>() * 20.0;
        let pressure = 1013.0 + (rng.random::<f64>() - 0.5) * 10.0;
        Self {
            rng,
            full_precision,
            phase,
            temperature: 20.0,
            pressure,
            battery,
        }
    }

    /// Standard normal sample (Box-Muller).
    fn gauss(&mut self) -> f64 {
        let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn spike(&mut self, size: f64) -> f64 {
        if self.rng.random::<f64>() < 0.001 {
            if self.rng.random::<bool>() {
                size
            } else {
                -size
            }
        } else {
            0.0
        }
    }

    /// The value of `sensor` at `ts_ms`, at the sensor's resolution (as a
    /// device that prints "21.37" would send it) unless full precision.
    pub fn sample(&mut self, sensor: &str, ts_ms: i64) -> f64 {
        let v = self.raw(sensor, ts_ms);
        if self.full_precision {
            return v;
        }
        let scale = match sensor {
            "temperature" | "pressure" => 100.0,
            "humidity" | "battery" => 10.0,
            _ => 100.0,
        };
        (v * scale).round() / scale
    }

    fn raw(&mut self, sensor: &str, ts_ms: i64) -> f64 {
        let day = (ts_ms as f64 / DAY_MS) * std::f64::consts::TAU + self.phase;
        match sensor {
            "temperature" => {
                self.temperature = 20.0 + 6.0 * day.sin() + 0.3 * self.gauss();
                self.temperature + self.spike(15.0)
            }
            "humidity" => {
                let h = 55.0 - 1.8 * (self.temperature - 20.0) + 1.0 * self.gauss();
                (h + self.spike(20.0)).clamp(0.0, 100.0)
            }
            "pressure" => {
                self.pressure += 0.02 * (1013.0 - self.pressure) + 0.05 * self.gauss();
                self.pressure + self.spike(5.0)
            }
            "battery" => {
                self.battery = (self.battery - 0.0005 * (1.0 + self.rng.random::<f64>())).max(0.0);
                self.battery
            }
            _ => 50.0 + 10.0 * day.sin() + self.gauss() + self.spike(30.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_signal_and_plausible_ranges() {
        let mut a = SignalGen::new(7, 3, false);
        let mut b = SignalGen::new(7, 3, false);
        let mut c = SignalGen::new(8, 3, false);
        let mut differs = false;
        for i in 0..1000 {
            let ts = 1_700_000_000_000 + i * 1000;
            for s in ["temperature", "humidity", "pressure", "battery"] {
                let (va, vb, vc) = (a.sample(s, ts), b.sample(s, ts), c.sample(s, ts));
                assert_eq!(va, vb);
                differs |= va != vc;
                assert!(va.is_finite());
                if s == "humidity" {
                    assert!((0.0..=100.0).contains(&va));
                }
                if s == "battery" {
                    assert!((0.0..=100.0).contains(&va));
                }
            }
        }
        assert!(differs, "another seed gives another signal");
    }

    #[test]
    fn values_come_at_the_sensor_resolution() {
        let mut q = SignalGen::new(7, 3, false);
        for i in 0..100 {
            let ts = 1_700_000_000_000 + i * 1000;
            let t = q.sample("temperature", ts);
            assert_eq!(t, (t * 100.0).round() / 100.0);
            let h = q.sample("humidity", ts);
            assert_eq!(h, (h * 10.0).round() / 10.0);
        }
    }
}
