// warmstart's launcher for a Node command-line tool (`warmstart record --tool`).
//
//   node -e "$(cat node_tool.js)" script PATH -- ARGS...   (the tool's `node PATH ARGS`)
//
// Node cannot load a script's dependencies without running it, so the tool is warmed by
// its priming runs (WARMSTART_TOOL_PRIME, JSON: each run's arguments; output to stderr,
// process.exit intercepted, until the event loop has nothing of the run's left, so its
// async part runs before the snapshot and never in a warm run): its modules stay in
// require's cache, the script itself is dropped from it. Then the launcher tells
// warmstart every file loaded (WARMSTART_FILE=... lines on the notify fd) and that it is
// warm (READY=1): the snapshot is taken in its read of the notify fd. Each restored
// instance reads its run's request there (argv, cwd, environment, umask) and runs the
// script as `node PATH ARGS` would, as the main module.
//
// A module whose loading is cut short by process.exit (a tool that does its work in its
// module's top level, as tsc does) leaves require's cache: the warm run loads it again,
// as it must to run the tool. What a cold start would see is kept: process.execArgv has
// no `-e CODE` of the launcher (a tool forking node with it would run the launcher), the
// process listeners a priming run added are removed, and the stdio streams Node made
// while warming up (for the record's pipes) are made again for each run's own stdio, so
// a terminal is a TTY (isTTY, columns, colors) and a file is written synchronously.
'use strict';
const fs = require('fs');
const path = require('path');
const Module = require('module');

// `node [OPTIONS] -e CODE`: the tool's own options only.
if (process.execArgv.length >= 2 && process.execArgv[process.execArgv.length - 2] === '-e') {
  process.execArgv = process.execArgv.slice(0, -2);
}
delete process._eval;

// Node makes process.stdin/stdout/stderr at their first use, for the kind of fd they are
// then: note which ones are made before the snapshot.
const STDIO = ['stdin', 'stdout', 'stderr'];
const stdioGetters = {};
const stdioMade = new Set();
const stdioStreams = new Set();
for (const name of STDIO) {
  const d = Object.getOwnPropertyDescriptor(process, name);
  stdioGetters[name] = d;
  Object.defineProperty(process, name, {
    configurable: true,
    enumerable: d.enumerable,
    get() {
      stdioMade.add(name);
      const stream = d.get.call(process);
      stdioStreams.add(stream);
      return stream;
    },
  });
}

const [mode, target, sep, ...recorded] = process.argv.slice(1);
if (mode !== 'script' || sep !== '--') {
  fs.writeSync(2, 'warmstart: bad launcher arguments\n');
  process.exit(2);
}
const fd = Number(process.env.WARMSTART_NOTIFY_FD);
delete process.env.WARMSTART_NOTIFY_FD;
delete process.env.NOTIFY_SOCKET;
const primes = JSON.parse(process.env.WARMSTART_TOOL_PRIME || '[]');
delete process.env.WARMSTART_TOOL_PRIME;
const argv1 = path.resolve(target);
const main = fs.realpathSync(argv1);

// Words of a priming argument string: whitespace-separated, '…' and "…" quote.
function split(s) {
  const out = [];
  const re = /'([^']*)'|"([^"]*)"|(\S+)/g;
  let m;
  while ((m = re.exec(s)) !== null) out.push(m[1] ?? m[2] ?? m[3]);
  return out;
}

function runMain(args) {
  process.argv = [process.execPath, argv1, ...args];
  delete require.cache[main];
  Module._load(main, null, true);
}

// A message of the launcher's own, without making process.stderr.
function say(s) {
  fs.writeSync(2, s);
}

const EXIT = Symbol('exit');
// How long a priming run's async part may take before the snapshot is taken anyway.
const PRIME_WAIT_MS = 10000;

// One priming run: the tool with the words of `p`, its stdout to stderr and process.exit
// intercepted, until what it started is done, its async part (callbacks, promises)
// included, so none of it is left for the warm runs; then `done()`.
function primeRun(p, done) {
  const listeners = new Map(process.eventNames().map((e) => [e, process.listeners(e)]));
  const write = process.stdout.write;
  const exit = process.exit;
  let code;
  const exited = (c) => {
    if (code === undefined) code = c;
  };
  const caught = (e) => {
    if (e && e[EXIT]) return;
    console.error(e);
    exited(1);
  };
  process.stdout.write = process.stderr.write.bind(process.stderr);
  process.exit = (c) => {
    exited(c ?? process.exitCode ?? 0);
    throw { [EXIT]: true };
  };
  process.on('uncaughtException', caught);
  process.on('unhandledRejection', caught);
  try {
    runMain(split(p));
  } catch (e) {
    caught(e);
  }
  const start = Date.now();
  const settle = () => {
    const busy = pending();
    if (busy.length > 0 && Date.now() - start < PRIME_WAIT_MS) {
      setTimeout(() => setImmediate(settle), 2);
      return;
    }
    if (busy.length > 0) {
      say(
        `warmstart: the priming run with '${p}' still waits on ${busy.join(', ')} after ` +
          `${PRIME_WAIT_MS / 1000} s: the snapshot is taken with it\n`,
      );
    }
    exited(process.exitCode ?? 0);
    process.stdout.write = write;
    process.exit = exit;
    process.exitCode = undefined;
    // A listener the run added (an 'exit' handler, say) is not the next run's.
    for (const e of process.eventNames()) {
      const before = listeners.get(e) ?? [];
      for (const l of process.listeners(e)) {
        if (!before.includes(l)) process.removeListener(e, l);
      }
    }
    say(`warmstart: primed with '${p}': exit status ${code}\n`);
    done();
  };
  setImmediate(settle);
}

// What would keep a cold process alive: ref'd handles (the stdio streams aside: Node's
// are ref'd but not active), requests, ref'd timers and immediates (not the immediate
// running this).
function pending() {
  const info = process.getActiveResourcesInfo();
  if (typeof process._getActiveHandles !== 'function') return info;
  const timers = info.filter((t) => t === 'Timeout' || t === 'Immediate');
  const handles = process._getActiveHandles().filter((h) => !stdioStreams.has(h));
  const requests = process._getActiveRequests();
  return [...handles, ...requests].map((h) => h?.constructor?.name ?? 'handle').concat(timers);
}

// The priming runs one after the other, then the snapshot and the run.
function primeFrom(i) {
  if (i < primes.length) {
    primeRun(primes[i], () => primeFrom(i + 1));
  } else {
    warm();
  }
}
primeFrom(0);

// Tells warmstart it is warm; the snapshot is taken while it waits for the reply. Then
// the run: the one recorded (left running after the record) or a restored run's.
function warm() {
  delete require.cache[main];
  const files = new Set([process.execPath, main, ...Object.keys(require.cache)]);
  let msg = '';
  for (const f of [...files].sort()) {
    if (!f.includes('\n') && fs.existsSync(f) && fs.statSync(f).isFile()) {
      msg += `WARMSTART_FILE=${f}\n`;
    }
  }
  fs.writeSync(fd, msg + 'READY=1\n');
  // The snapshot is taken in this read.
  const reply = readLine();
  if (!reply.startsWith('RESTORED=1')) {
    // Left running after the record: run once with the recorded arguments.
    runMain(recorded);
    return;
  }
  const head = readLine();
  if (!head.startsWith('TOOL ')) {
    say(`warmstart: unexpected request ${JSON.stringify(head.slice(0, 40))}\n`);
    process.exit(2);
  }
  const len = Number(head.slice(5));
  const body = Buffer.alloc(len);
  let got = 0;
  while (got < len) {
    const n = fs.readSync(fd, body, got, len - got, null);
    if (n === 0) {
      say('warmstart: the notify channel closed before the request\n');
      process.exit(2);
    }
    got += n;
  }
  fs.closeSync(fd);
  const req = JSON.parse(body.toString('utf8'));
  process.chdir(req.cwd);
  for (const k of Object.keys(process.env)) delete process.env[k];
  Object.assign(process.env, req.env);
  process.umask(req.umask);
  freshStdio();
  runMain(req.args);
}

function readLine() {
  const b = Buffer.alloc(1);
  let s = '';
  while (!s.endsWith('\n')) {
    if (fs.readSync(fd, b, 0, 1, null) === 0) break;
    s += b.toString('latin1');
  }
  return s;
}

// The kind of handle Node makes a stdio stream of for `fd` (libuv's uv_guess_handle).
function handleKind(fd) {
  if (require('tty').isatty(fd)) return 'TTY';
  let st;
  try {
    st = fs.fstatSync(fd);
  } catch {
    return 'UNKNOWN';
  }
  if (st.isFile() || st.isCharacterDevice()) return 'FILE';
  if (st.isFIFO() || st.isSocket()) return 'PIPE';
  return 'UNKNOWN';
}

// Node's own destroy of a stdio stream: the fd is never closed.
function keepFd(err, cb) {
  cb(err);
  if (!this._writableState.emitClose) process.nextTick(() => this.emit('close'));
}

// process.stdout / process.stderr as Node makes them for `fd`.
function writableStdio(fd) {
  const kind = handleKind(fd);
  let s;
  if (kind === 'TTY') {
    s = new (require('tty').WriteStream)(fd);
    s._type = 'tty';
  } else if (kind === 'FILE') {
    // Node's SyncWriteStream (not reachable from a script): every write done at once.
    const { Writable } = require('stream');
    s = new Writable({
      autoDestroy: true,
      write(chunk, _enc, cb) {
        fs.writeSync(fd, chunk);
        cb();
      },
    });
    s.readable = false;
    s.autoClose = false;
    s._type = 'fs';
  } else if (kind === 'PIPE') {
    s = new (require('net').Socket)({ fd, readable: false, writable: true });
    s._type = 'pipe';
  } else {
    const { Writable } = require('stream');
    s = new Writable({ write: (_b, _e, cb) => cb() });
  }
  s.fd = fd;
  s._isStdio = true;
  s.destroySoon = s.destroy;
  s._destroy = keepFd;
  if (s.isTTY) process.on('SIGWINCH', () => s._refreshSize());
  return s;
}

// process.stdin as Node makes it.
function readableStdio() {
  const fd = 0;
  const kind = handleKind(fd);
  let s;
  if (kind === 'TTY') {
    s = new (require('tty').ReadStream)(fd, { highWaterMark: 0, readable: true, writable: false });
  } else if (kind === 'FILE') {
    s = new fs.ReadStream(null, { fd, autoClose: false });
  } else if (kind === 'PIPE') {
    s = new (require('net').Socket)({ fd, readable: true, writable: false, manualStart: true });
    s._writableState.ended = true;
  } else {
    const { Readable } = require('stream');
    s = new Readable({ read() {} });
    s.push(null);
  }
  s.fd = fd;
  if (s._handle && s._handle.readStop) {
    s._handle.reading = false;
    s._readableState.reading = false;
    s._handle.readStop();
  }
  s.on('pause', () => {
    process.nextTick(() => {
      if (s._handle && s._handle.reading && !s.readableFlowing) {
        s._readableState.reading = false;
        s._handle.reading = false;
        s._handle.readStop();
      }
    });
  });
  return s;
}

// This run's stdio streams: Node's own lazy ones where none was made before the
// snapshot, else new ones for the fds this run has (the old ones stay open, unused).
function freshStdio() {
  for (const name of STDIO) {
    if (!stdioMade.has(name)) {
      Object.defineProperty(process, name, stdioGetters[name]);
      continue;
    }
    let stream;
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: stdioGetters[name].enumerable,
      get() {
        if (!stream) {
          stream = name === 'stdin' ? readableStdio() : writableStdio(name === 'stdout' ? 1 : 2);
        }
        return stream;
      },
    });
  }
  // The global console took the old streams at its first use: it takes them again.
  console._stdout = undefined;
  console._stderr = undefined;
}
