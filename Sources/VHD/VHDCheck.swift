import Foundation

/// What `vhd-info` shows of one file.
public struct VHDInfo: Codable, Sendable {
    public var path: String
    public var diskType: String
    public var virtualSize: UInt64
    public var blockSize: UInt32
    public var allocatedBlocks: Int
    public var maxTableEntries: Int
    public var uniqueID: String
    public var parentUniqueID: String?
    public var parentPath: String?
    public var parentUnicodeName: String?
    public var creatorApplication: String
    public var creatorHostOS: String
    public var fileSize: UInt64
    public var warnings: [String]

    public init(file f: VHDFile) throws(VHDError) {
        path = f.path
        diskType = f.diskType.description
        virtualSize = f.virtualSize
        blockSize = f.blockSize
        allocatedBlocks = f.allocatedBlockCount
        maxTableEntries = Int(f.header?.maxTableEntries ?? 0)
        uniqueID = f.uniqueID.uuidString.lowercased()
        creatorApplication = f.footer.creatorApplicationString
        creatorHostOS = String(decoding: f.footer.creatorHostOS, as: UTF8.self)
        fileSize = try f.file.length()
        warnings = f.warnings
        if f.diskType == .differencing, let h = f.header {
            parentUniqueID = UUID(uuid: uuidTuple(h.parentUniqueID)).uuidString.lowercased()
            parentUnicodeName = h.parentUnicodeName
            parentPath = f.parentLocatorPaths().first?.1
        }
    }
}

/// Structural checks, like `vhd-util check`: each problem found, none means clean.
public enum VHDCheck {
    public static func check(path: String) -> [String] {
        var problems: [String] = []
        let f: VHDFile
        do {
            f = try VHDFile.open(path: path, writable: false, policy: .tolerate)
        } catch {
            return ["\(path): \(error)"]
        }
        defer { f.close() }
        problems += f.warnings.map { "\(path): \($0)" }
        do {
            let len = try f.file.length()
            if f.diskType != .fixed {
                let head = try Footer.parse(try f.file.read(at: 0, count: 512), policy: .tolerate)
                if head.serialize() != f.footer.serialize() {
                    problems.append("\(path): footer copy at offset 0 differs from the trailing footer")
                }
                if len % 512 != 0 { problems.append("\(path): file length \(len) is not a multiple of 512") }
                if let h = f.header {
                    let bat = f.blockAllocationTable
                    let span = UInt64(h.bitmapBytes) + UInt64(h.blockSize)
                    // Every structure's extent; none may overlap another (the BAT may sit
                    // anywhere, after a resize relocated it past the data).
                    var extents: [(name: String, range: Range<UInt64>)] = [
                        ("footer copy", 0..<512),
                        ("header", f.footer.dataOffset..<(f.footer.dataOffset + 1024)),
                        ("BAT", h.tableOffset..<(h.tableOffset + UInt64(BlockAllocationTable.byteLength(entries: bat.entries.count)))),
                    ]
                    for (i, l) in h.parentLocatorEntries.enumerated() where l.platformCode != .none && l.platformDataLength > 0 {
                        let (stop, over) = l.platformDataOffset.addingReportingOverflow(UInt64(l.platformDataLength))
                        guard !over, stop <= len else {
                            problems.append("\(path): parent locator \(i) at byte \(l.platformDataOffset) lies past the end of the file")
                            continue
                        }
                        extents.append(("parent locator \(i)", l.platformDataOffset..<stop))
                    }
                    for (i, e) in bat.entries.enumerated() where e != BlockAllocationTable.unallocated {
                        extents.append(("block \(i) at \(UInt64(e) * 512)", (UInt64(e) * 512)..<(UInt64(e) * 512 + span)))
                    }
                    extents.sort { $0.range.lowerBound < $1.range.lowerBound }
                    var prevEnd: UInt64 = 0
                    var prevName = ""
                    for x in extents {
                        if x.range.lowerBound < prevEnd {
                            problems.append("\(path): \(x.name) overlaps \(prevName)")
                        }
                        if x.range.upperBound > prevEnd { prevEnd = x.range.upperBound; prevName = x.name }
                    }
                    if prevEnd > len - 512 { problems.append("\(path): data runs into the trailing footer") }
                }
                if f.diskType == .differencing {
                    do {
                        let chain = try VHDChain.open(path: path, writable: false, policy: .tolerate)
                        chain.close()
                    } catch {
                        problems.append("\(path): \(error)")
                    }
                }
            }
            let g = DiskGeometry(forSize: f.virtualSize)
            if f.footer.creatorApplicationString == "tap", g != f.footer.diskGeometry {
                problems.append("\(path): disk geometry does not match the spec's CHS for the size")
            }
        } catch {
            problems.append("\(path): \(error)")
        }
        return problems
    }
}
