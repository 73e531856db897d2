//! `hub certs`: a CA, the hub's certificate and device certificates that
//! work together (rustls refuses what most tutorials make: a self-signed
//! server certificate that is also a CA). Made here with rcgen, written as
//! PEM files (keys 0600); a CA already in the directory is reused, so more
//! devices can be issued later.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The CA's name: fixed, so a CA read back from its key is the same issuer.
const CA_NAME: &str = "telemetry-hub CA";

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Directory to write into (made if missing). A CA there (ca.pem,
    /// ca.key) is reused; no other file is overwritten.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// A name the hub is reached by, DNS name or IP address (repeatable).
    #[arg(long = "hub-name", default_values_t = ["127.0.0.1".to_owned(), "localhost".to_owned()])]
    pub hub_names: Vec<String>,
    /// A device id to issue a certificate for (repeatable): its CN, and a
    /// URI SAN, so any auth.tls_identity but san_dns finds it.
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// How long the certificates are valid, in days.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
}

/// Writes what `args` asks for and says what to do with it.
pub fn run(args: &CertsArgs, out: &mut impl Write) -> anyhow::Result<()> {
    make_private_dir(&args.out)?;
    let (ca_key, ca) = ca(&args.out, args.days, out)?;
    let hub_pem = args.out.join("hub.pem");
    if hub_pem.exists() {
        writeln!(out, "kept      {} (it exists)", hub_pem.display())?;
    } else {
        let sans = args
            .hub_names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(name.clone().try_into().with_context(
                    || format!("{name:?} is neither an IP address nor a DNS name"),
                )?)),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut params = leaf(args.days, "telemetry-hub")?;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        issue(&args.out, "hub", params, &ca, &ca_key, out)?;
    }
    for device in &args.devices {
        crate::domain::DeviceId::parse(device)?;
        let mut params = leaf(args.days, device)?;
        params.subject_alt_names =
            vec![SanType::URI(device.clone().try_into().with_context(
                || format!("{device:?} cannot be a URI SAN"),
            )?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let der = issue(&args.out, device, params, &ca, &ca_key, out)?;
        writeln!(
            out,
            "          its SHA-256 (hub devices pin-cert / revoke-cert): {}",
            hex::encode(crate::auth::certificate_sha256(&der))
        )?;
    }
    let dir = args.out.display();
    writeln!(
        out,
        "\nThe hub's settings:\n  [server.tls]\n  cert = \"{dir}/hub.pem\"\n  key = \"{dir}/hub.key\"\n  \
         client_ca = \"{dir}/ca.pem\"\n  [auth]\n  devices = \"tls\"\n\
         A device: device-sim --hub https://127.0.0.1:50051 --ca {dir}/ca.pem \
         --cert {dir}/DEVICE.pem --key {dir}/DEVICE.key --devices 1 --id-prefix DEVICE"
    )?;
    Ok(())
}

/// The CA of `dir`, made if it has none.
fn ca(
    dir: &Path,
    days: u32,
    out: &mut impl Write,
) -> anyhow::Result<(KeyPair, rcgen::Certificate)> {
    let (pem, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if key_path.exists() {
        // The same name and key: certificates it signs chain to ca.pem.
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path)?)
            .with_context(|| format!("{} is not a private key", key_path.display()))?;
        let cert = params.self_signed(&key)?;
        writeln!(out, "reused    {}", pem.display())?;
        return Ok((key, cert));
    }
    validity(&mut params, days.saturating_mul(2))?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&pem, cert.pem().as_bytes(), 0o644)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    writeln!(
        out,
        "wrote     {} (give it to devices and operators: --ca) and {}",
        pem.display(),
        key_path.display()
    )?;
    Ok((key, cert))
}

/// A leaf certificate named `cn`, not a CA.
fn leaf(days: u32, cn: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days)?;
    Ok(params)
}

/// Signs `params` with the CA, writes NAME.pem and NAME.key; the DER.
fn issue(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    out: &mut impl Write,
) -> anyhow::Result<Vec<u8>> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca, ca_key)?;
    let pem = dir.join(format!("{name}.pem"));
    write_new(&pem, cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    writeln!(out, "wrote     {} and its .key", pem.display())?;
    Ok(cert.der().to_vec())
}

/// From yesterday (clocks differ) for `days`.
fn validity(params: &mut CertificateParams, days: u32) -> anyhow::Result<()> {
    let today = crate::domain::now_ms().div_euclid(86_400_000);
    let (y, m, d) = civil(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + i64::from(days));
    params.not_after = rcgen::date_time_ymd(y, m, d);
    Ok(())
}

/// (year, month, day) of days since 1970-01-01 (Howard Hinnant's
/// civil_from_days).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Writes a file that must not exist yet, with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        bail!("{} exists; remove it to make a new one", path.display());
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_days() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_454), (2026, 1, 1));
        assert_eq!(civil(20_512), (2026, 2, 28));
        assert_eq!(civil(19_417), (2023, 3, 1));
    }
}
