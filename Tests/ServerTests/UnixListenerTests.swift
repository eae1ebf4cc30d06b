import Control
import Foundation
import Server
import XCTest

/// `listenUnix`: the control socket appears under its name already listening, after the
/// server's banner, replacing a stale one without a moment with none, and never a file
/// that is not a socket.
final class UnixListenerTests: XCTestCase {
    private var dir = ""

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("vdinbd-unix-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// nil when a client connects to the Unix socket at `path`, else why it could not.
    private func connectError(_ path: String) -> String? {
        do { _ = try ControlClient(path: path); return nil } catch { return "\(error)" }
    }

    func testTheSocketAppearsListeningAfterBeforePublishingAndReplacesAStaleOne() throws {
        let path = dir + "/control.sock"
        // A killed server's socket: the file is there, nobody listens.
        close(try listenUnix(path: path, mode: 0o600))
        XCTAssertTrue(connectError(path)?.contains("Connection refused") == true, "\(connectError(path) ?? "connected")")
        var during: (stale: Bool, staging: String?)?
        let fd = try listenUnix(path: path, mode: 0o600) {
            during = (FileManager.default.fileExists(atPath: path), self.connectError(path + ".new"))
        }
        defer { close(fd) }
        XCTAssertEqual(during?.stale, true, "the old socket was removed before the new one took its name")
        XCTAssertNotNil(during)
        XCTAssertNil(during?.staging, "the staged socket did not listen yet when the banner was written")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".new"))
        XCTAssertNil(connectError(path))
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFSOCK)
    }

    func testAFileThatIsNotASocketIsNeverReplaced() throws {
        let path = dir + "/precious"
        try Data("keep me".utf8).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try listenUnix(path: path, mode: 0o600)) { error in
            XCTAssertTrue("\(error)".contains("exists and is not a socket"), "\(error)")
        }
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "keep me")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".new"))
    }

    func testAPathTooLongIsRefusedWithItsLimitAndLeavesNothing() {
        let path = dir + "/" + String(repeating: "x", count: 120)
        XCTAssertThrowsError(try listenUnix(path: path, mode: 0o600)) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("socket path too long (\(path.utf8.count) bytes, 103 at most)"), text)
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [])
    }
}
