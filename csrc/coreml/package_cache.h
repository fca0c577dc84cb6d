// The on-disk cache of compiled Core ML models: an .mlpackage (or .mlmodel)
// is compiled once into an .mlmodelc stored under a key made of the package's
// content hash (SHA-256 over every file's relative path, size and bytes) and a
// salt (the OS version, since the compiler ships with the OS).
//
// Hashing a multi-GB package on every load would cost seconds, so an index maps
// a cheap fingerprint (canonical path, every file's size and mtime) to the
// content key; a changed file changes its fingerprint and the content is hashed
// again. Entries are installed by rename from a staging directory, so a reader
// never sees a half-written .mlmodelc and concurrent processes do not clash.
//
// Portable C++17 (std::filesystem), header-only: used by coreml_backend.mm on
// macOS and compiled on its own by tests/test_coreml_package_cache.py on Linux.
// No function throws; each returns false and writes *err on failure.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace anemll {
namespace coreml_cache {

namespace fs = std::filesystem;

// Bumped when the key derivation or the layout below changes.
constexpr const char* kLayoutVersion = "anemll_fast-coreml-cache-v1";

// ------------------------------------------------------------------ SHA-256
// FIPS 180-4; small and dependency-free so that the key is the same on every
// platform and checkable against Python's hashlib.
class Sha256 {
 public:
  Sha256() { reset(); }

  void reset() {
    static const uint32_t init[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                     0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    std::memcpy(h_, init, sizeof h_);
    len_ = 0;
    fill_ = 0;
  }

  void update(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    len_ += n;
    while (n > 0) {
      const size_t take = std::min(n, sizeof buf_ - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == sizeof buf_) {
        block(buf_);
        fill_ = 0;
      }
    }
  }

  void update(const std::string& s) { update(s.data(), s.size()); }

  std::string hex_digest() {
    const uint64_t bits = len_ * 8u;
    const uint8_t pad = 0x80;
    update(&pad, 1);
    const uint8_t zero = 0;
    while (fill_ != 56) update(&zero, 1);
    uint8_t lenbuf[8];
    for (int i = 0; i < 8; ++i) lenbuf[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    update(lenbuf, 8);
    static const char* hexd = "0123456789abcdef";
    std::string out;
    out.reserve(64);
    for (uint32_t w : h_)
      for (int i = 3; i >= 0; --i) {
        const uint8_t b = static_cast<uint8_t>(w >> (8 * i));
        out.push_back(hexd[b >> 4]);
        out.push_back(hexd[b & 15]);
      }
    reset();
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void block(const uint8_t* b) {
    static const uint32_t k[64] = {
        0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
        0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
        0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
        0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
        0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
        0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
        0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
        0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t(b[4 * i]) << 24) | (uint32_t(b[4 * i + 1]) << 16) | (uint32_t(b[4 * i + 2]) << 8) |
             uint32_t(b[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], bb = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & bb) ^ (a & c) ^ (bb & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = bb;
      bb = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += bb;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

  uint32_t h_[8];
  uint8_t buf_[64];
  uint64_t len_;
  size_t fill_;
};

inline std::string sha256_hex(const std::string& s) {
  Sha256 h;
  h.update(s);
  return h.hex_digest();
}

// ------------------------------------------------------------ file listing
struct Entry {
  std::string rel;  // '/'-separated path relative to the package root ("" for a single file)
  bool is_dir = false;
  uint64_t size = 0;
  int64_t mtime = 0;  // file clock ticks; only compared for equality
};

inline void u64_bytes(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// Every entry of `path` (a directory tree or one regular file), sorted by
// relative path. Symbolic links are refused: a package must be self-contained.
inline bool list_entries(const std::string& path, std::vector<Entry>* out, std::string* err) {
  out->clear();
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(path, ec);
  if (ec || !fs::exists(st)) {
    *err = path + ": no such file or directory";
    return false;
  }
  if (fs::is_regular_file(st)) {
    Entry e;
    e.size = fs::file_size(path, ec);
    if (!ec) e.mtime = static_cast<int64_t>(fs::last_write_time(path, ec).time_since_epoch().count());
    if (ec) {
      *err = path + ": cannot stat: " + ec.message();
      return false;
    }
    out->push_back(e);
    return true;
  }
  if (!fs::is_directory(st)) {
    *err = path + ": neither a directory nor a regular file";
    return false;
  }
  fs::recursive_directory_iterator it(path, fs::directory_options::none, ec), end;
  if (ec) {
    *err = path + ": cannot list: " + ec.message();
    return false;
  }
  for (; it != end; it.increment(ec)) {
    if (ec) {
      *err = path + ": cannot list: " + ec.message();
      return false;
    }
    const fs::path p = it->path();
    const fs::file_status s = it->symlink_status(ec);
    if (ec) {
      *err = p.string() + ": cannot stat: " + ec.message();
      return false;
    }
    Entry e;
    e.rel = p.lexically_relative(path).generic_string();
    if (fs::is_symlink(s)) {
      *err = p.string() + ": symbolic links are not allowed inside a model package";
      return false;
    }
    if (fs::is_directory(s)) {
      e.is_dir = true;
    } else if (fs::is_regular_file(s)) {
      e.size = fs::file_size(p, ec);
      if (!ec) e.mtime = static_cast<int64_t>(fs::last_write_time(p, ec).time_since_epoch().count());
      if (ec) {
        *err = p.string() + ": cannot stat: " + ec.message();
        return false;
      }
    } else {
      *err = p.string() + ": not a regular file or directory";
      return false;
    }
    out->push_back(std::move(e));
  }
  std::sort(out->begin(), out->end(), [](const Entry& a, const Entry& b) { return a.rel < b.rel; });
  return true;
}

inline std::string join(const std::string& root, const std::string& rel) {
  return rel.empty() ? root : (fs::path(root) / fs::path(rel)).string();
}

// SHA-256 of the package content: for each entry in path order, "D" rel NUL
// for directories, "F" rel NUL size(8 bytes LE) bytes for files.
inline bool content_digest(const std::string& path, std::string* hex, std::string* err) {
  std::vector<Entry> entries;
  if (!list_entries(path, &entries, err)) return false;
  Sha256 h;
  std::vector<char> buf(1 << 20);
  for (const Entry& e : entries) {
    std::string head = e.is_dir ? "D" : "F";
    head += e.rel;
    head.push_back('\0');
    if (!e.is_dir) u64_bytes(e.size, &head);
    h.update(head);
    if (e.is_dir) continue;
    const std::string file = join(path, e.rel);
    std::ifstream in(file, std::ios::binary);
    if (!in) {
      *err = file + ": cannot open for reading";
      return false;
    }
    uint64_t seen = 0;
    while (in) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      const std::streamsize got = in.gcount();
      if (got <= 0) break;
      h.update(buf.data(), static_cast<size_t>(got));
      seen += static_cast<uint64_t>(got);
    }
    if (in.bad() || seen != e.size) {
      *err = file + ": read error (file changed while hashing?)";
      return false;
    }
  }
  *hex = h.hex_digest();
  return true;
}

// SHA-256 of the canonical path and every entry's kind, size and mtime: cheap
// (no content read), changes whenever a file is rewritten.
inline bool fingerprint(const std::string& path, const std::string& salt, std::string* hex, std::string* err) {
  std::vector<Entry> entries;
  if (!list_entries(path, &entries, err)) return false;
  std::error_code ec;
  const fs::path canon = fs::canonical(path, ec);
  if (ec) {
    *err = path + ": cannot resolve: " + ec.message();
    return false;
  }
  Sha256 h;
  h.update(std::string(kLayoutVersion) + '\0' + salt + '\0' + canon.string() + '\0');
  for (const Entry& e : entries) {
    std::string rec = (e.is_dir ? "D" : "F") + e.rel;
    rec.push_back('\0');
    u64_bytes(e.size, &rec);
    u64_bytes(static_cast<uint64_t>(e.mtime), &rec);
    h.update(rec);
  }
  *hex = h.hex_digest();
  return true;
}

// ---------------------------------------------------------------- the cache
// $ANEMLL_FAST_COREML_CACHE, else ~/Library/Caches/anemll_fast/coreml on macOS,
// else $XDG_CACHE_HOME/anemll_fast/coreml or ~/.cache/anemll_fast/coreml.
inline bool default_root(std::string* root, std::string* err) {
  const char* env = std::getenv("ANEMLL_FAST_COREML_CACHE");
  if (env && *env) {
    *root = env;
    return true;
  }
  const char* home = std::getenv("HOME");
#if defined(__APPLE__)
  if (home && *home) {
    *root = (fs::path(home) / "Library" / "Caches" / "anemll_fast" / "coreml").string();
    return true;
  }
#else
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && *xdg) {
    *root = (fs::path(xdg) / "anemll_fast" / "coreml").string();
    return true;
  }
  if (home && *home) {
    *root = (fs::path(home) / ".cache" / "anemll_fast" / "coreml").string();
    return true;
  }
#endif
  *err = "no cache directory: set ANEMLL_FAST_COREML_CACHE (HOME is not set)";
  return false;
}

inline bool write_file_atomic(const std::string& path, const std::string& text, std::string* err) {
  std::random_device rd;
  const std::string tmp = path + ".tmp-" + std::to_string(rd()) + std::to_string(rd());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) {
      *err = tmp + ": cannot write";
      return false;
    }
    out << text;
    if (!out.flush()) {
      *err = tmp + ": write error";
      return false;
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    *err = path + ": cannot install: " + ec.message();
    return false;
  }
  return true;
}

struct Lookup {
  std::string key;       // content key (hex SHA-256 of layout version, salt and content digest)
  std::string compiled;  // where the compiled .mlmodelc lives (or will live)
  bool hit = false;      // compiled already exists
  bool hashed = false;   // the content had to be hashed (index miss)
};

inline std::string compiled_name(const std::string& package) {
  fs::path p(package);
  if (!p.has_filename()) p = p.parent_path();  // "x.mlpackage/" -> "x.mlpackage"
  return p.stem().string() + ".mlmodelc";
}

inline std::string entry_dir(const std::string& root, const std::string& key) {
  return (fs::path(root) / key).string();
}

// Where the compiled form of `package` is (hit) or belongs (miss).
inline bool lookup(const std::string& root, const std::string& package, const std::string& salt, Lookup* out,
                   std::string* err) {
  *out = Lookup();
  std::string fp;
  if (!fingerprint(package, salt, &fp, err)) return false;
  std::error_code ec;
  const fs::path index_dir = fs::path(root) / "index";
  fs::create_directories(index_dir, ec);
  if (ec) {
    *err = index_dir.string() + ": cannot create cache directory: " + ec.message();
    return false;
  }
  const fs::path index_file = index_dir / fp;
  std::string key;
  {
    std::ifstream in(index_file, std::ios::binary);
    if (in) std::getline(in, key);
  }
  const bool valid = key.size() == 64 && key.find_first_not_of("0123456789abcdef") == std::string::npos;
  if (!valid) {
    std::string digest;
    if (!content_digest(package, &digest, err)) return false;
    key = sha256_hex(std::string(kLayoutVersion) + '\0' + salt + '\0' + digest);
    out->hashed = true;
    if (!write_file_atomic(index_file.string(), key + "\n", err)) return false;
  }
  out->key = key;
  out->compiled = (fs::path(entry_dir(root, key)) / compiled_name(package)).string();
  out->hit = fs::is_directory(out->compiled, ec);
  return true;
}

inline bool copy_tree(const fs::path& src, const fs::path& dst, std::string* err) {
  std::error_code ec;
  fs::copy(src, dst, fs::copy_options::recursive, ec);
  if (ec) {
    *err = "cannot copy " + src.string() + " to " + dst.string() + ": " + ec.message();
    return false;
  }
  return true;
}

// Installs the compiled directory `src` as `compiled` (from lookup): staged
// beside the final entry, then renamed into place. `src` is moved if on the
// same volume, else copied (and left for its owner to delete). When another
// process installed the same entry first, ours is dropped and that one used.
inline bool install(const std::string& root, const Lookup& l, const std::string& src, std::string* err) {
  std::error_code ec;
  const fs::path final_dir = fs::path(l.compiled).parent_path();
  if (fs::is_directory(l.compiled, ec)) return true;
  fs::create_directories(root, ec);
  if (ec) {
    *err = root + ": cannot create cache directory: " + ec.message();
    return false;
  }
  std::random_device rd;
  const fs::path staging = fs::path(root) / (".staging-" + std::to_string(rd()) + std::to_string(rd()));
  fs::create_directory(staging, ec);
  if (ec) {
    *err = staging.string() + ": cannot create: " + ec.message();
    return false;
  }
  const fs::path staged = staging / fs::path(l.compiled).filename();
  fs::rename(src, staged, ec);
  if (ec) {  // e.g. EXDEV: the compiler's temporary directory is on another volume
    ec.clear();
    if (!copy_tree(src, staged, err)) {
      fs::remove_all(staging, ec);
      return false;
    }
  }
  // A leftover entry without the compiled model (interrupted older layout) is replaced.
  if (fs::exists(final_dir, ec) && !fs::is_directory(l.compiled, ec)) fs::remove_all(final_dir, ec);
  fs::rename(staging, final_dir, ec);
  if (ec) {
    std::error_code ec2;
    fs::remove_all(staging, ec2);
    if (fs::is_directory(l.compiled, ec2)) return true;  // a concurrent install won
    *err = final_dir.string() + ": cannot install compiled model: " + ec.message();
    return false;
  }
  return true;
}

}  // namespace coreml_cache
}  // namespace anemll
