// Reads a speedscope file with speedscope's own importer (the code the app runs when a file is
// dropped on it), headlessly, and prints what it imported as one JSON line per profile:
// {name, unit, total, frames: [{name, self, total}]}.
//
// speedscope ships only a browser bundle. Its importer is a plain function inside it, so this
// finds the function by the string it dispatches on, exposes it, and runs the bundle in a VM
// context without a DOM: the app's start-up then fails (no `window`), after the importer is
// defined. Everything is found by pattern and fails loudly if the pinned release changes.
//
// Usage: node speedscope-import.mjs NODE_DIR FILE
import fs from 'node:fs';
import path from 'node:path';
import vm from 'node:vm';

const [nodeDir, file] = process.argv.slice(2);
const release = path.join(nodeDir, 'node_modules/speedscope/dist/release');
const bundleName = fs.readdirSync(release).find((f) => /^speedscope-[\w]+\.js$/.test(f));
if (!bundleName) throw new Error(`no speedscope bundle in ${release}`);
let src = fs.readFileSync(path.join(release, bundleName), 'utf8');

const dispatch = src.match(
  /\$schema==="https:\/\/www\.speedscope\.app\/file-format-schema\.json"\)return console\.log\("Importing as speedscope json file"\),([\w$]+)\(/,
);
if (!dispatch) throw new Error('cannot find the speedscope-format importer in the bundle');
const importer = dispatch[1];
const declaration = src.indexOf(`function ${importer}(`);
if (declaration < 0) throw new Error(`cannot find function ${importer}`);
// The lazily initialised module that defines the importer's dependencies follows it.
const moduleInit = /var ([\w$]+)=re\(\(\)=>\{[^}]*\}\);/g;
moduleInit.lastIndex = declaration;
const init = moduleInit.exec(src);
if (!init) throw new Error('cannot find the importer module initialiser');
const hook = `${init[0]}globalThis.__livetraceImport=t=>{${init[1]}();return ${importer}(t)};`;
src = src.slice(0, init.index) + hook + src.slice(init.index + init[0].length);

const quiet = { log() {}, warn() {}, error() {}, info() {} };
const context = vm.createContext({ console: quiet, TextDecoder, TextEncoder });
try {
  vm.runInContext(src, context);
} catch {
  // The app's start-up needs a browser; the importer is defined before it.
}
if (typeof context.__livetraceImport !== 'function') {
  throw new Error('the importer hook was not installed');
}
const group = context.__livetraceImport(JSON.parse(fs.readFileSync(file, 'utf8')));
for (const profile of group.profiles) {
  const frames = [];
  profile.forEachFrame((f) =>
    frames.push({ name: f.name, self: f.getSelfWeight(), total: f.getTotalWeight() }),
  );
  console.log(
    JSON.stringify({
      name: profile.getName(),
      unit: profile.getWeightUnit(),
      total: profile.getTotalWeight(),
      frames,
    }),
  );
}
