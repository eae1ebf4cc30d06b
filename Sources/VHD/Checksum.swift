/// VHD spec: the checksum is the one's complement of the byte sum of the structure with
/// the checksum field itself taken as zero.
func vhdChecksum(_ bytes: [UInt8], checksumOffset: Int) -> UInt32 {
    var sum: UInt32 = 0
    for (i, b) in bytes.enumerated() where i < checksumOffset || i >= checksumOffset + 4 {
        sum &+= UInt32(b)
    }
    return ~sum
}

/// Seconds since 2000-01-01 00:00:00 UTC, the VHD epoch.
public let vhdEpochOffsetFromUnix: Int64 = 946_684_800

/// Whether to refuse structures whose checksum does not match.
///
/// Our own SR files are always opened `.strict`. libvhdi ignores checksums, and some
/// tools in the field patch fields without updating them; `.tolerate` opens such files
/// and records each mismatch in `VHDFile.warnings` so `vhd-check` still reports it.
public enum ChecksumPolicy: Sendable {
    case strict
    case tolerate
}
