import Foundation
import XCTest
@testable import TLS

final class CertificateTests: XCTestCase {
    func testFirstRunGeneratesLoadableMaterialAndNeverOverwrites() throws {
        let dir = NSTemporaryDirectory() + "certs-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        XCTAssertTrue(try CertificateFactory.ensure(directory: dir, dnsNames: ["host.test", "localhost"], ipAddresses: ["127.0.0.1"]))
        let before = try String(contentsOfFile: dir + "/server-cert.pem", encoding: .utf8)
        XCTAssertFalse(try CertificateFactory.ensure(directory: dir, dnsNames: ["other"], ipAddresses: []))
        XCTAssertEqual(try String(contentsOfFile: dir + "/server-cert.pem", encoding: .utf8), before)
        let attrs = try FileManager.default.attributesOfItem(atPath: dir + "/server-key.pem")
        XCTAssertEqual((attrs[.posixPermissions] as? NSNumber)?.intValue, 0o600)
        let creds = try ServerCredentials(certsDirectory: dir)
        XCTAssertEqual(creds.subject, "host.test")
        XCTAssertTrue(creds.trustAnchorPEM.contains("BEGIN CERTIFICATE"))
    }

    func testBadPriorityStringIsTypedError() throws {
        let dir = NSTemporaryDirectory() + "certs-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try CertificateFactory.ensure(directory: dir, dnsNames: ["h"], ipAddresses: [])
        XCTAssertThrowsError(try ServerCredentials(certsDirectory: dir, priority: "NOT-A-PRIORITY")) {
            XCTAssertTrue($0 is GnuTLSError)
        }
    }

    func testMissingCertificateIsTypedError() {
        XCTAssertThrowsError(try ServerCredentials(certsDirectory: "/nonexistent")) { XCTAssertTrue($0 is GnuTLSError) }
    }
}
