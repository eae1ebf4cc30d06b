// Design notes: the chain-edit journal.
//
// A chain edit that takes more than one atomic step (a coalesce: copy, relink, delete)
// first writes an entry to `<sr>/journal/<id>.json` (written to a temporary name, synced,
// renamed, the directory synced), advances its phase the same way, and removes the entry
// when done. At start-up, before anything opens a chain, `SR.recoverJournal` finishes or
// undoes every entry left behind, so a crash at any moment leaves the SR as before the
// edit or as after it. Each step is written so redoing it is harmless.

import Foundation

/// One chain edit in progress.
struct JournalEntry: Codable, Equatable, Sendable {
    enum Operation: String, Codable, Sendable {
        /// Merging a hidden layer into its hidden parent, then relinking its children.
        case coalesce
        /// Merging a leaf into its hidden parent, which then takes the leaf's name.
        case leafCoalesce = "leaf-coalesce"
        /// Removing a hidden base no record and no file needs.
        case delete
        /// A validated import's image (`staging`) taking the place of a VDI's file.
        case replace
        /// A validated import (`staging`) being written onto a VDI through its handle;
        /// finished from the staging file at the next start.
        case importCommit = "import-commit"
        /// A VDI's state copied into a file of another format (`staging`), which then
        /// takes its place.
        case migrate
    }

    enum Phase: String, Codable, Sendable {
        /// Data is being copied into the parent: the child still holds all of it, so an
        /// interrupted copy is simply dropped (the parent's extra bytes are hidden by it).
        case copying
        /// The copy is complete and synced: relinking or renaming, redone at recovery.
        case switching
    }

    var id: String
    var operation: Operation
    /// The layer merged away (or deleted).
    var child: String
    /// The layer it is merged into.
    var parent: String?
    var phase: Phase
    var started: Date
    /// `replace`, `importCommit`: the staging file's path.
    var staging: String? = nil
    /// `importCommit`: the byte ranges staged (pairs of start and end), whether the rest
    /// of the disk becomes zeros, and whether the staging file is an image (else raw).
    var runs: [[UInt64]]? = nil
    var replaces: Bool? = nil
    var stagedImage: Bool? = nil
    /// `migrate` to another SR: that SR's uuid (the staging file is in its directory).
    var destination: String? = nil
}

final class Journal: Sendable {
    let directory: String

    init(directory: String) { self.directory = directory }

    func prepare() throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        for n in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where n.hasSuffix(".tmp") {
            unlink("\(directory)/\(n)")
        }
    }

    func path(_ id: String) -> String { "\(directory)/\(id).json" }

    /// Writes (or replaces) the entry durably.
    func write(_ e: JournalEntry) throws {
        let enc = JSONEncoder()
        enc.dateEncodingStrategy = .iso8601
        enc.outputFormatting = [.sortedKeys]
        let data = try enc.encode(e)
        let tmp = path(e.id) + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StorageError.srBackendFailure(detail: "journal \(tmp): \(String(cString: strerror(errno)))") }
        let ok = data.withUnsafeBytes { b in Glibc.write(fd, b.baseAddress, b.count) == b.count } && fsync(fd) == 0
        close(fd)
        guard ok, rename(tmp, path(e.id)) == 0 else {
            unlink(tmp)
            throw StorageError.srBackendFailure(detail: "journal \(path(e.id)): \(String(cString: strerror(errno)))")
        }
        syncDirectory()
    }

    func remove(_ id: String) {
        unlink(path(id))
        syncDirectory()
    }

    /// The entries left by an earlier run, oldest first. An unreadable entry is reported
    /// with its name and kept for an administrator.
    func entries() -> (valid: [JournalEntry], unreadable: [String]) {
        let dec = JSONDecoder()
        dec.dateDecodingStrategy = .iso8601
        var out: [JournalEntry] = [], bad: [String] = []
        for n in ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted() where n.hasSuffix(".json") {
            if let d = FileManager.default.contents(atPath: "\(directory)/\(n)"), let e = try? dec.decode(JournalEntry.self, from: d) {
                out.append(e)
            } else {
                bad.append(n)
            }
        }
        return (out.sorted { $0.started < $1.started }, bad)
    }

    private func syncDirectory() {
        let fd = open(directory, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }
}
