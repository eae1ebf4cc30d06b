// A migration's switch to another SR of the pool (see SR-Migrate.swift): the VDI's file,
// change log, record and export tokens go to the destination, then leave this SR. The
// destination's record is the commit point: a crash before it leaves the VDI here as it
// was (the copies made so far are removed), a crash after it is finished at start-up by
// `Pool.recover`, once both SRs are open.

import CBT
import Foundation
import GRDB
import Image

extension SR {
    /// The switch of a move (redone by `Pool.recover`): each step can be repeated.
    func finishMove(_ uuid: String, staging: String, to dest: SR, format f: any ImageFormat) throws {
        let newPath = dest.imagePath(uuid, format: f)
        if try dest.anyRecord(uuid) == nil {
            guard var r = try anyRecord(uuid) else { throw StorageError.vdiMissing(uuid: uuid) }
            // 1. The file takes its name in the destination.
            if FileManager.default.fileExists(atPath: staging) {
                guard rename(staging, newPath) == 0 else {
                    throw StorageError.vdiIOError(uuid: uuid, detail: "rename \(staging): \(String(cString: strerror(errno)))")
                }
            }
            // 2. The change log, copied whole (its chain's earlier links stay here).
            if FileManager.default.fileExists(atPath: cbtLogPath(uuid)) {
                try copyFileDurably(cbtLogPath(uuid), to: dest.cbtLogPath(uuid))
            }
            try dest.syncDirectory()
            // 3. The record and the tokens: from here the VDI is the destination's.
            r.parent = nil
            if r.smConfig["image-format"] != nil { r.smConfig["image-format"] = f.name }
            let tokens = try dbRead { try TokenRecord.filter(Column("vdi_uuid") == uuid).fetchAll($0) }
            let moved = r
            try dest.dbWrite { db in
                try moved.insert(db)
                for t in tokens { try t.save(db) }
            }
            collector.stepHook?("move-committed")
        } else if FileManager.default.fileExists(atPath: staging) {
            guard rename(staging, newPath) == 0 else {
                throw StorageError.vdiIOError(uuid: uuid, detail: "rename \(staging): \(String(cString: strerror(errno)))")
            }
            try dest.syncDirectory()
        }
        dest.remember(uuid, f)
        // 4. Gone from here: the record first, so no record here names a missing file.
        try dbWrite { db in
            _ = try VDIRecord.deleteOne(db, key: uuid)
            _ = try TokenRecord.filter(Column("vdi_uuid") == uuid).deleteAll(db)
        }
        for g in Formats.all { unlink(imagePath(uuid, format: g)) }
        ChangeLog.remove(path: cbtLogPath(uuid))
        try syncDirectory()
        formatCache.withLock { _ = $0.removeValue(forKey: uuid) }
    }

    /// Undoes a move whose switch never committed: the destination's copies go.
    func undoMove(_ uuid: String, staging: String, to dest: SR) {
        unlink(staging)
        if (try? dest.anyRecord(uuid)) == nil {
            for g in Formats.all { unlink(dest.imagePath(uuid, format: g)) }
            ChangeLog.remove(path: dest.cbtLogPath(uuid))
            try? dest.syncDirectory()
        }
    }

    /// Gives a live handle (I/O held off, switch done) to the destination: its table, its
    /// attachments, and the change log there.
    func handOver(_ h: VDIHandle, to dest: SR) throws {
        if h.cbt != nil {
            let log: ChangeLog
            do { log = try ChangeLog.open(path: dest.cbtLogPath(h.uuid)) } catch {
                throw StorageError.vdiIOError(uuid: h.uuid, detail: "the moved change log: \(error)")
            }
            try? log.setConsistent(false)
            h.exclusivelyCBTHeld { _ in log }
        }
        handlesLock.lock()
        if handles[h.key] === h { handles[h.key] = nil }
        handlesLock.unlock()
        dest.handlesLock.lock()
        dest.handles[h.key] = h
        dest.handlesLock.unlock()
        let attached = attachmentTable.withLock { $0.removeValue(forKey: h.uuid) }
        if let a = attached { dest.attachmentTable.withLock { $0[h.uuid] = a } }
    }

    /// Copies a file under a temporary name, syncs it and renames it into place.
    func copyFileDurably(_ from: String, to: String) throws {
        let tmp = to + ".copying"
        unlink(tmp)
        let src = open(from, O_RDONLY | O_CLOEXEC)
        guard src >= 0 else { throw StorageError.vdiIOError(uuid: "", detail: "open \(from): \(String(cString: strerror(errno)))") }
        defer { close(src) }
        let dst = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard dst >= 0 else { throw StorageError.vdiIOError(uuid: "", detail: "create \(tmp): \(String(cString: strerror(errno)))") }
        var ok = false
        defer {
            close(dst)
            if !ok { unlink(tmp) }
        }
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        var at: off_t = 0
        while true {
            let n = buf.withUnsafeMutableBytes { pread(src, $0.baseAddress, $0.count, at) }
            guard n >= 0 else { throw StorageError.vdiIOError(uuid: "", detail: "read \(from): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            var done = 0
            while done < n {
                let w = buf.withUnsafeBytes { pwrite(dst, $0.baseAddress! + done, n - done, at + off_t(done)) }
                guard w > 0 else { throw StorageError.vdiIOError(uuid: "", detail: "write \(tmp): \(String(cString: strerror(errno)))") }
                done += w
            }
            at += off_t(n)
        }
        guard fsync(dst) == 0, ChangeLog.rename(tmp, to: to) else {
            throw StorageError.vdiIOError(uuid: "", detail: "\(to): \(String(cString: strerror(errno)))")
        }
        ok = true
    }
}

extension Pool {
    /// Finishes or undoes the moves between SRs a crash interrupted in their switch (each
    /// SR's own start-up dropped those cut while copying). A move to an SR not hosted now
    /// is left for a start that hosts it.
    public func recover() throws {
        for sr in srs {
            for e in sr.journal.entries().valid where e.operation == .migrate && e.phase == .switching {
                guard let d = e.destination, let staging = e.staging else { continue }
                guard let dest = self.sr(named: d) else {
                    sr.logger.error("recovery: VDI \(e.child) was moving to SR \(d), which this server does not host now; left as it is until it does")
                    continue
                }
                if try dest.anyRecord(e.child) != nil {
                    try sr.finishMove(e.child, staging: staging, to: dest, format: sr.format(at: staging))
                    sr.logger.warning("recovery: finished moving VDI \(e.child) to SR \(dest.uuid)")
                } else {
                    sr.undoMove(e.child, staging: staging, to: dest)
                    sr.logger.warning("recovery: undid an unfinished move of VDI \(e.child) to SR \(dest.uuid) (it stays here as it was)")
                }
                sr.journal.remove(e.id)
            }
        }
    }
}
