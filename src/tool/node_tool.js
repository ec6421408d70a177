// warmstart's launcher for a Node command-line tool (`warmstart record --tool`).
//
//   node -e "$(cat node_tool.js)" script PATH -- ARGS...   (the tool's `node PATH ARGS`)
//
// Node cannot load a script's dependencies without running it, so the tool is warmed by
// its priming runs (WARMSTART_TOOL_PRIME, JSON: each run's arguments; output to stderr,
// process.exit intercepted; the script's synchronous part only): its modules stay in
// require's cache, the script itself is dropped from it. Then the launcher tells
// warmstart every file loaded (WARMSTART_FILE=... lines on the notify fd) and that it is
// warm (READY=1): the snapshot is taken in its read of the notify fd. Each restored
// instance reads its run's request there (argv, cwd, environment, umask) and runs the
// script as `node PATH ARGS` would, as the main module.
'use strict';
const fs = require('fs');
const path = require('path');
const Module = require('module');

const [mode, target, sep, ...recorded] = process.argv.slice(1);
if (mode !== 'script' || sep !== '--') {
  process.stderr.write('warmstart: bad launcher arguments\n');
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

const EXIT = Symbol('exit');
for (const p of primes) {
  const write = process.stdout.write;
  const exit = process.exit;
  process.stdout.write = process.stderr.write.bind(process.stderr);
  process.exit = (c) => {
    throw { [EXIT]: c ?? process.exitCode ?? 0 };
  };
  let code = 0;
  try {
    runMain(split(p));
    code = process.exitCode ?? 0;
  } catch (e) {
    if (e && e[EXIT] !== undefined) {
      code = e[EXIT];
    } else {
      console.error(e);
      code = 1;
    }
  } finally {
    process.stdout.write = write;
    process.exit = exit;
    process.exitCode = undefined;
  }
  process.stderr.write(`warmstart: primed with '${p}': exit status ${code}\n`);
}
delete require.cache[main];

const files = new Set([process.execPath, main, ...Object.keys(require.cache)]);
let msg = '';
for (const f of [...files].sort()) {
  if (!f.includes('\n') && fs.existsSync(f) && fs.statSync(f).isFile()) {
    msg += `WARMSTART_FILE=${f}\n`;
  }
}
fs.writeSync(fd, msg + 'READY=1\n');

function readLine() {
  const b = Buffer.alloc(1);
  let s = '';
  while (!s.endsWith('\n')) {
    if (fs.readSync(fd, b, 0, 1, null) === 0) break;
    s += b.toString('latin1');
  }
  return s;
}

// The snapshot is taken in this read.
const reply = readLine();
if (!reply.startsWith('RESTORED=1')) {
  // Left running after the record: run once with the recorded arguments.
  runMain(recorded);
} else {
  const head = readLine();
  if (!head.startsWith('TOOL ')) {
    process.stderr.write(`warmstart: unexpected request ${JSON.stringify(head.slice(0, 40))}\n`);
    process.exit(2);
  }
  const len = Number(head.slice(5));
  const body = Buffer.alloc(len);
  let got = 0;
  while (got < len) {
    const n = fs.readSync(fd, body, got, len - got, null);
    if (n === 0) {
      process.stderr.write('warmstart: the notify channel closed before the request\n');
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
  runMain(req.args);
}
