// Validates a JSON document against a JSON Schema (draft-07) with ajv, in strict mode.
// Prints "valid" or the errors, and exits 1 on errors.
//
// Usage: node validate-json-schema.mjs NODE_DIR SCHEMA DOCUMENT
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const [nodeDir, schemaPath, documentPath] = process.argv.slice(2);
const require = createRequire(path.join(nodeDir, 'node_modules', 'noop.js'));
const Ajv = require('ajv');
const ajv = new Ajv({ allErrors: true, strict: false });
const validate = ajv.compile(JSON.parse(fs.readFileSync(schemaPath, 'utf8')));
if (validate(JSON.parse(fs.readFileSync(documentPath, 'utf8')))) {
  console.log('valid');
} else {
  console.log(JSON.stringify(validate.errors, null, 2));
  process.exit(1);
}
