import Foundation
import XCTest

/// A test case with a fresh directory for its files, removed afterwards.
class TemporaryDirectoryTestCase: XCTestCase {
    var dir: String!

    override func setUp() {
        dir = NSTemporaryDirectory() + "vhdtests-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }
}
