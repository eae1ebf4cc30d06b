// Generates the CA and server certificate on first run, as `certtool` would: a self-signed
// CA, and a server certificate it signs with the host names and listen addresses as SANs.
// Existing material is never overwritten; key files are created mode 0600.

import CGnuTLS
import Foundation
#if canImport(Glibc)
import Glibc
#endif

public enum CertificateFactory {
    /// Creates ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem in `dir` if none exist.
    /// Returns false when material was already there.
    @discardableResult
    public static func ensure(directory dir: String, dnsNames: [String], ipAddresses: [String]) throws -> Bool {
        let fm = FileManager.default
        let names = ["ca-cert.pem", "server-cert.pem", "server-key.pem"]
        if names.contains(where: { fm.fileExists(atPath: dir + "/" + $0) }) { return false }
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let caKey = try newKey()
        let ca = try newCert(cn: "vdinbd CA", key: caKey, isCA: true, dns: [], ips: [], issuer: nil, issuerKey: nil)
        let srvKey = try newKey()
        let srv = try newCert(cn: dnsNames.first ?? "localhost", key: srvKey, isCA: false, dns: dnsNames, ips: ipAddresses,
                              issuer: ca, issuerKey: caKey)
        try write(dir + "/ca-key.pem", try exportKey(caKey), mode: 0o600)
        try write(dir + "/server-key.pem", try exportKey(srvKey), mode: 0o600)
        try write(dir + "/ca-cert.pem", try exportCert(ca), mode: 0o644)
        try write(dir + "/server-cert.pem", try exportCert(srv), mode: 0o644)
        gnutls_x509_crt_deinit(ca); gnutls_x509_crt_deinit(srv)
        gnutls_x509_privkey_deinit(caKey); gnutls_x509_privkey_deinit(srvKey)
        return true
    }

    static func write(_ path: String, _ data: String, mode: mode_t) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else { throw GnuTLSError(-1, "create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bytes = Array(data.utf8)
        guard Glibc.write(fd, bytes, bytes.count) == bytes.count else { throw GnuTLSError(-1, "write \(path)") }
        fchmod(fd, mode)
    }

    static func newKey() throws -> gnutls_x509_privkey_t {
        var k: gnutls_x509_privkey_t?
        try check(gnutls_x509_privkey_init(&k), "gnutls_x509_privkey_init")
        try check(gnutls_x509_privkey_generate(k, GNUTLS_PK_RSA, 2048, 0), "generating an RSA key")
        return k!
    }

    static func newCert(cn: String, key: gnutls_x509_privkey_t, isCA: Bool, dns: [String], ips: [String],
                        issuer: gnutls_x509_crt_t?, issuerKey: gnutls_x509_privkey_t?) throws -> gnutls_x509_crt_t {
        var c: gnutls_x509_crt_t?
        try check(gnutls_x509_crt_init(&c), "gnutls_x509_crt_init")
        let crt = c!
        try check(gnutls_x509_crt_set_version(crt, 3), "set_version")
        var serial = (0..<16).map { _ in UInt8.random(in: 0...255) }
        serial[0] &= 0x7f
        try check(gnutls_x509_crt_set_serial(crt, &serial, serial.count), "set_serial")
        let now = time(nil)
        try check(gnutls_x509_crt_set_activation_time(crt, now - 3600), "set_activation_time")
        try check(gnutls_x509_crt_set_expiration_time(crt, now + 3650 * 86400), "set_expiration_time")
        let dn = "CN=\(cn.replacingOccurrences(of: ",", with: "\\,"))"
        var err: UnsafePointer<CChar>?
        try check(gnutls_x509_crt_set_dn(crt, dn, &err), "set_dn")
        try check(gnutls_x509_crt_set_key(crt, key), "set_key")
        try check(gnutls_x509_crt_set_basic_constraints(crt, isCA ? 1 : 0, -1), "set_basic_constraints")
        if isCA {
            try check(gnutls_x509_crt_set_key_usage(crt, UInt32(GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN)), "set_key_usage")
        } else {
            try check(gnutls_x509_crt_set_key_usage(crt, UInt32(GNUTLS_KEY_DIGITAL_SIGNATURE | GNUTLS_KEY_KEY_ENCIPHERMENT)),
                      "set_key_usage")
            try check(gnutls_x509_crt_set_key_purpose_oid(crt, "1.3.6.1.5.5.7.3.1", 0), "set_key_purpose_oid")
            for d in dns {
                try check(gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_DNSNAME, d, UInt32(d.utf8.count), UInt32(GNUTLS_FSAN_APPEND)),
                          "DNS SAN \(d)")
            }
            for ip in ips {
                var raw = [UInt8](repeating: 0, count: 16)
                var len = 0
                if inet_pton(AF_INET, ip, &raw) == 1 { len = 4 } else if inet_pton(AF_INET6, ip, &raw) == 1 { len = 16 }
                guard len > 0 else { continue }
                try check(gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, raw, UInt32(len), UInt32(GNUTLS_FSAN_APPEND)),
                          "IP SAN \(ip)")
            }
        }
        var keyID = [UInt8](repeating: 0, count: 64)
        var keyIDSize = keyID.count
        if gnutls_x509_crt_get_key_id(crt, 0, &keyID, &keyIDSize) >= 0 {
            _ = gnutls_x509_crt_set_subject_key_id(crt, keyID, keyIDSize)
        }
        if let iss = issuer {
            var akid = [UInt8](repeating: 0, count: 64)
            var akidSize = akid.count
            if gnutls_x509_crt_get_subject_key_id(iss, &akid, &akidSize, nil) >= 0 {
                _ = gnutls_x509_crt_set_authority_key_id(crt, akid, akidSize)
            }
        }
        try check(gnutls_x509_crt_sign2(crt, issuer ?? crt, issuerKey ?? key, GNUTLS_DIG_SHA256, 0), "signing")
        return crt
    }

    static func exportCert(_ c: gnutls_x509_crt_t) throws -> String {
        var d = gnutls_datum_t()
        try check(gnutls_x509_crt_export2(c, GNUTLS_X509_FMT_PEM, &d), "exporting certificate")
        defer { free(d.data) }
        return String(decoding: UnsafeBufferPointer(start: d.data, count: Int(d.size)), as: UTF8.self)
    }

    static func exportKey(_ k: gnutls_x509_privkey_t) throws -> String {
        var d = gnutls_datum_t()
        try check(gnutls_x509_privkey_export2(k, GNUTLS_X509_FMT_PEM, &d), "exporting key")
        defer { free(d.data) }
        return String(decoding: UnsafeBufferPointer(start: d.data, count: Int(d.size)), as: UTF8.self)
    }

    /// The first DNS SAN of a PEM certificate file.
    public static func firstDNSName(pemFile: String) throws -> String {
        let pem = Array(try String(contentsOfFile: pemFile, encoding: .utf8).utf8)
        var c: gnutls_x509_crt_t?
        try check(gnutls_x509_crt_init(&c), "gnutls_x509_crt_init")
        defer { gnutls_x509_crt_deinit(c) }
        try pem.withUnsafeBufferPointer { (p) throws in
            var d = gnutls_datum_t(data: UnsafeMutablePointer(mutating: p.baseAddress), size: UInt32(p.count))
            try check(gnutls_x509_crt_import(c, &d, GNUTLS_X509_FMT_PEM), "importing \(pemFile)")
        }
        for i in 0..<32 {
            var buf = [CChar](repeating: 0, count: 1024)
            var size = buf.count
            let t = gnutls_x509_crt_get_subject_alt_name(c, UInt32(i), &buf, &size, nil)
            if t < 0 { break }
            if t == Int32(GNUTLS_SAN_DNSNAME.rawValue) { return String(cString: buf) }
        }
        return ""
    }
}
