//! Kubernetes resource quantities (`500m`, `128Mi`, `1e3`), just enough for the
//! downward API's `resourceFieldRef`, which the kubelet renders as ⌈value ÷ divisor⌉.

/// A quantity that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Kubernetes quantity (e.g. 500m, 2, 128Mi, 1G)")]
pub struct QuantityError(pub String);

/// The value of a quantity, in base units (cores, bytes).
pub fn parse(text: &str) -> Result<f64, QuantityError> {
    let bad = || QuantityError(text.to_owned());
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let mantissa: f64 = number.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..].parse().map_err(|_| bad())?;
            if !(-30..=30).contains(&power) {
                return Err(bad());
            }
            10f64.powi(power)
        }
        _ => return Err(bad()),
    };
    let value = mantissa * scale;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(bad())
    }
}

/// What `resourceFieldRef` puts in the environment: ⌈value ÷ divisor⌉ as an integer.
pub fn divided(value: f64, divisor: &str) -> Result<String, QuantityError> {
    let d = parse(divisor)?;
    if d == 0.0 {
        return Err(QuantityError(divisor.to_owned()));
    }
    // A tiny tolerance keeps 0.1/0.001 from becoming 101 through float error.
    let ratio = value / d;
    let rounded = (ratio - 1e-9).ceil().max(0.0);
    if rounded > 9.0e15 {
        return Err(QuantityError(divisor.to_owned()));
    }
    Ok(format!("{}", rounded as u64))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse("2").unwrap(), 2.0);
        assert_eq!(parse("500m").unwrap(), 0.5);
        assert_eq!(parse("128Mi").unwrap(), 134_217_728.0);
        assert_eq!(parse("1G").unwrap(), 1e9);
        assert_eq!(parse("1e3").unwrap(), 1000.0);
        assert_eq!(parse("1.5Gi").unwrap(), 1.5 * 1024.0 * 1024.0 * 1024.0);
        for bad in ["", "m", "12q", "1e999", "-1", "1..2", "e3"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn divides_rounding_up_as_the_kubelet_does() {
        assert_eq!(divided(0.5, "1").unwrap(), "1");
        assert_eq!(divided(0.25, "1m").unwrap(), "250");
        assert_eq!(divided(0.1, "1m").unwrap(), "100");
        assert_eq!(divided(134_217_728.0, "1Mi").unwrap(), "128");
        assert_eq!(divided(134_217_729.0, "1Mi").unwrap(), "129");
        assert!(divided(1.0, "0").is_err());
        assert!(divided(1e30, "1n").is_err());
    }
}
