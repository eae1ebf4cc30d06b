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

    /// 0, or the errno of a connect to the Unix socket at `path`.
    private func connectError(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return rc == 0 ? 0 : errno
    }

    func testTheSocketAppearsListeningAfterBeforePublishingAndReplacesAStaleOne() throws {
        let path = dir + "/control.sock"
        // A killed server's socket: the file is there, nobody listens.
        close(try listenUnix(path: path, mode: 0o600))
        XCTAssertEqual(connectError(path), ECONNREFUSED)
        var during: (stale: Bool, staging: Int32)?
        let fd = try listenUnix(path: path, mode: 0o600) {
            during = (FileManager.default.fileExists(atPath: path), self.connectError(path + ".new"))
        }
        defer { close(fd) }
        XCTAssertEqual(during?.stale, true, "the old socket was removed before the new one took its name")
        XCTAssertEqual(during?.staging, 0, "the staged socket did not listen yet when the banner was written")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".new"))
        XCTAssertEqual(connectError(path), 0)
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
